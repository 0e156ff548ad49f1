"""Fits one after another in the same two ranks, started outside the strategy (as bench/plan_accuracy.py runs its
layouts): the ranks' threads stay bounded (each process group is built once per process), and every fit runs
with the strategy's intra-op thread count."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.distributed import _suggested_max_num_threads

import tiny
from distributed import run_distributed

LAYOUTS = [dict(ep=2), dict(tp=2), dict(pp=2, microbatches=2)]
ROUNDS = 3


class IntraOpThreads(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = torch.get_num_threads()


def _fits(corpus: str) -> dict[str, list[int]]:
    """Every layout ROUNDS times. The first fit runs under an explicit OMP_NUM_THREADS; before the second, the
    variable is removed and torch is left at another thread count, as in a rank an external launcher started."""
    explicit = _suggested_max_num_threads(2) + 1
    os.environ["OMP_NUM_THREADS"] = str(explicit)
    torch.set_num_threads(explicit)
    tasks, intra_op = [], []
    for i in range(ROUNDS * len(LAYOUTS)):
        if i == 1:
            del os.environ["OMP_NUM_THREADS"]
            torch.set_num_threads(explicit)
        seen = IntraOpThreads()
        tiny.fit(corpus, tiny.model_config(), steps=1, callbacks=[seen], **LAYOUTS[i % len(LAYOUTS)])
        tasks.append(len(os.listdir("/proc/self/task")))
        intra_op.append(seen.seen)
    return {"tasks": tasks, "intra_op": intra_op}


@pytest.fixture(scope="module")
def fits(corpus):
    return run_distributed(2, _fits, str(corpus), timeout=200)


@pytest.mark.timeout(240)
def test_repeated_layouts_reuse_their_process_groups(fits):
    """After the first round the later rounds add no thread."""
    n = len(LAYOUTS)
    for rank in fits:
        tasks = rank["tasks"]
        assert tasks[n:] == [tasks[n - 1]] * (len(tasks) - n), tasks


@pytest.mark.timeout(240)
def test_every_rank_gets_the_thread_policy_however_started(fits):
    """An explicit OMP_NUM_THREADS is kept; without it each rank runs on its share of the CPUs."""
    explicit = _suggested_max_num_threads(2) + 1
    for rank in fits:
        assert rank["intra_op"] == [explicit] + [_suggested_max_num_threads(2)] * (ROUNDS * len(LAYOUTS) - 1)
