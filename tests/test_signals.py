"""SIGTERM and SIGINT stop a multi-process run at an agreed step with a complete last.ckpt and the conventional exit
code; `ckpt_path=last` continues it with the losses of an uninterrupted run; smartmoe-generate samples from the
pipeline-parallel checkpoint it left.

Four real CLI runs of 2 processes (pp=2, float64, the same config): A gets SIGTERM on rank 1 only after its step-4
checkpoint, B SIGINT on its whole process group after step 8; A2 and B2 resume them with ckpt_path=last. Up to B's
stop B is an uninterrupted run, and from A's stop on so is A2: their losses are compared over the steps they share.
"""

import csv
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import cli
from tiny import RTOL

STEPS = 14
BOUND_S = 60  # safety bound on signal-to-exit: 30 s plus a step and a save here take a few seconds
ARGS = ("recipe=gpt_moe_tiny", "trainer.devices=2", "parallel.pp=2", "parallel.microbatches=2", "trainer.precision=64-true",
        f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=4")


def _signal_after(folder: Path, step: int, send) -> callable:
    def poll(proc, children) -> bool:
        if (folder / "checkpoints" / f"epoch=0-step={step}.ckpt" / "meta.pt").is_file() and children:
            send(proc, children)
            return True
        return False
    return poll


def _train(folder: Path, *extra: str, on_poll=None) -> cli.Run:
    return cli.run("lightning_smartmoe.train", *ARGS, *extra, f"hydra.run.dir={folder}", cwd=folder, timeout=300, on_poll=on_poll)


def _losses(folder: Path, version: int) -> dict[int, float]:
    rows = csv.DictReader(open(folder / "logs" / f"version_{version}" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _stop_step(folder: Path) -> int:
    return torch.load(folder / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    a, b = tmp_path_factory.mktemp("sigterm"), tmp_path_factory.mktemp("sigint")
    term_rank_1 = lambda proc, children: os.kill(min(children), signal.SIGTERM)  # noqa: E731
    int_group = lambda proc, children: os.killpg(proc.pid, signal.SIGINT)  # noqa: E731
    out = {"a": a, "b": b}
    out["A"] = _train(a, on_poll=_signal_after(a, 4, term_rank_1))
    out["A_stop"] = _stop_step(a)
    out["B"] = _train(b, on_poll=_signal_after(b, 8, int_group))
    out["B_stop"] = _stop_step(b)
    out["A2"] = _train(a, "ckpt_path=last")
    out["B2"] = _train(b, "ckpt_path=last")
    print(f"\nSIGTERM to rank 1: exit {out['A'].returncode}, all gone {out['A'].all_gone_after_s:.1f} s after, stop step "
          f"{out['A_stop']}; SIGINT to the group: exit {out['B'].returncode}, all gone {out['B'].all_gone_after_s:.1f} s "
          f"after, stop step {out['B_stop']}")
    return out


def _same(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert math.isclose(got[step], want[step], rel_tol=RTOL, abs_tol=0), (step, got[step], want[step])


@pytest.mark.timeout(900)
def test_sigterm_to_one_rank_stops_all_at_a_step_and_resumes_identically(runs):
    run, a = runs["A"], runs["a"]
    assert run.returncode == 143, run.stderr[-3000:]
    assert len(run.children_seen) == 1 and run.all_gone_after_s < BOUND_S, run.all_gone_after_s
    stop = runs["A_stop"]
    assert 4 < stop < runs["B_stop"]
    assert sorted(_losses(a, 0)) == list(range(stop))  # every step up to the stop logged, none after
    assert [p.name for p in (a / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert runs["A2"].returncode == 0, runs["A2"].stderr[-3000:]
    resumed = _losses(a, 1)
    assert sorted(resumed) == list(range(stop, STEPS))
    _same(_losses(a, 0), _losses(runs["b"], 0), range(stop))  # A and B are the same run up to A's stop
    _same(resumed, _losses(runs["b"], 0), range(stop, runs["B_stop"]))  # B, uninterrupted there


@pytest.mark.timeout(900)
def test_sigint_to_the_group_stops_all_at_a_step_and_resumes_identically(runs):
    run, b = runs["B"], runs["b"]
    assert run.returncode == 130, run.stderr[-3000:]
    assert len(run.children_seen) == 1 and run.all_gone_after_s < BOUND_S, run.all_gone_after_s
    assert "Traceback" not in run.stderr
    stop = runs["B_stop"]
    assert sorted(_losses(b, 0)) == list(range(stop))
    assert runs["B2"].returncode == 0, runs["B2"].stderr[-3000:]
    resumed = _losses(b, 1)
    assert sorted(resumed) == list(range(stop, STEPS))
    _same(resumed, _losses(runs["a"], 1), range(stop, STEPS))  # A2, uninterrupted there


@pytest.mark.timeout(300)
def test_generate_samples_from_a_pipeline_parallel_checkpoint(runs, tmp_path):
    ckpt = runs["a"] / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt / "meta.pt", weights_only=False)["parallel"]["pp"] == 2
    run = cli.run("lightning_smartmoe.generate", f"ckpt_path={ckpt}", "prompt=def ", "max_new_tokens=40",
                  "temperature=0.8", cwd=tmp_path, timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout.rstrip("\n")
    assert text.startswith("def ") and len(text.encode("utf-8", errors="replace")) >= 4 + 20, text
