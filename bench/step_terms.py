"""What a training step of bench/layouts.py's GPT-MoE does, phase by phase and collective by collective.

One spawn of 4 gloo ranks (--world; as bench/plan_accuracy.py), one `Trainer.fit` per layout (--only: a regex on the names),
--warmup untimed steps then --steps timed ones. Per rank and timed step:
  phases   wall and process-CPU seconds of forward (batch start .. before backward), backward (.. after backward),
           sync (.. before the optimizer step: gradient buckets' wait, replica sums), clip (the norm and its
           all-reduce), adamw (torch's step), rest (.. batch end: scheduler, logging, signal check, hooks);
  calls    every torch.distributed call the step makes (all_reduce, all_gather, all_to_all_single (the dispatcher's
           counts and rows, forward and backward), broadcast, ...): count, bytes and wall seconds by (op, group size, caller).
Printed: per layout the phases of the slowest rank (median step) and the calls of rank 0; the last line is one
JSON object with all of it.

Run:  .venv/bin/python bench/step_terms.py --only 'pp1.ep1$|dp4.tp1.pp1.ep4$'
"""

import argparse
import collections
import functools
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import lightning.pytorch as pl  # noqa: E402
from distributed import run_distributed  # noqa: E402
from layouts import GLOBAL_BATCH, MODEL, THREADS, WORLD, layouts, model_config  # noqa: E402

from lightning_smartmoe import SmartMoEStrategy  # noqa: E402
from lightning_smartmoe.data import TokenDataModule  # noqa: E402
from lightning_smartmoe.models import MoELMModule, OptimConfig  # noqa: E402

OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
PHASES = ("forward", "backward", "sync", "clip", "adamw", "rest")
_CALLS: collections.Counter = collections.Counter()
_SECONDS: collections.Counter = collections.Counter()
_BYTES: collections.Counter = collections.Counter()
_RECORDING = [False]


def _caller() -> str:
    """The innermost lightning_smartmoe (or Lightning) frame outside this file: file:function."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "lightning_smartmoe" in frame.filename or "lightning/pytorch" in frame.filename:
            return f"{Path(frame.filename).stem}:{frame.name}"
    return "?"


def _group_size(kwargs: dict, args: tuple) -> int:
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _nbytes(args: tuple) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def _wrap(module, name: str, label: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        if not _RECORDING[0]:
            return original(*args, **kwargs)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        key = (label, _group_size(kwargs, args), _caller())
        _CALLS[key] += 1
        _SECONDS[key] += time.perf_counter() - start
        _BYTES[key] += _nbytes(args[:2])
        return out

    setattr(module, name, timed)


def instrument() -> None:
    for name in ("all_reduce", "all_gather", "all_to_all_single", "broadcast", "all_gather_into_tensor",
                 "reduce_scatter_tensor", "batch_isend_irecv", "barrier", "all_gather_object", "broadcast_object_list"):
        _wrap(dist, name, name)


class Phases(pl.Callback):
    """Wall and CPU seconds of each phase of each step after the warm-up (see the module doc)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[dict[str, list[float]]] = []
        self._marks: list[tuple[str, float, float]] = []

    def _mark(self, name: str) -> None:
        self._marks.append((name, time.perf_counter(), time.process_time()))

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        opt.register_step_post_hook(lambda *_: self._mark("adamw"))
        clip = trainer.strategy.precision_plugin.clip_grad_by_norm

        def timed_clip(*args, **kwargs):
            self._mark("sync")  # the clip starts: everything before it since backward was the sync
            out = clip(*args, **kwargs)
            self._mark("clip")
            return out

        trainer.strategy.precision_plugin.clip_grad_by_norm = timed_clip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _RECORDING[0] = batch_idx >= self.warmup
        self._marks = []
        self._mark("start")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._mark("forward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._mark("backward")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark("rest")
        if batch_idx < self.warmup:
            return
        out = {}
        for (_, t0, c0), (name, t1, c1) in zip(self._marks, self._marks[1:]):
            out[name] = [t1 - t0, c1 - c0]
        self.steps.append(out)


def run_case(lay: dict, corpus: str, warmup: int, steps: int, world: int) -> dict:
    pl.seed_everything(0, verbose=False)
    _CALLS.clear(), _SECONDS.clear(), _BYTES.clear()
    probe = Phases(warmup)
    strategy = SmartMoEStrategy(dp=lay["dp"], tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], expert_tp=lay["expert_tp"],
                                microbatches=lay["microbatches"], virtual_stages=lay["virtual_stages"],
                                pp_schedule=lay["schedule"] if lay["pp"] > 1 else "1f1b")
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, max_steps=warmup + steps, strategy=strategy, gradient_clip_val=1.0,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )
    dm = TokenDataModule(corpus, seq_len=MODEL["seq_len"], global_batch_size=GLOBAL_BATCH, vocab_size=MODEL["vocab_size"])
    trainer.fit(MoELMModule(model_config(), OPTIM), dm)
    _RECORDING[0] = False
    n = len(probe.steps)
    calls = [{"op": op, "n": size, "caller": caller, "per_step": _CALLS[k] / n, "bytes": _BYTES[k] / _CALLS[k],
              "ms_per_call": 1e3 * _SECONDS[k] / _CALLS[k]} for k in sorted(_CALLS) for op, size, caller in [k]]
    return {"steps": probe.steps, "calls": calls}


def worker(lays: list[dict], corpus: str, warmup: int, steps: int, world: int) -> list[dict]:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    instrument()
    return [run_case(lay, corpus, warmup, steps, world) for lay in lays]


def summary(lay: dict, per_rank: list[dict]) -> dict:
    """Per phase the median over steps of the slowest rank's wall and that rank's CPU seconds (ms)."""
    n = len(per_rank[0]["steps"])
    totals = [max(sum(r["steps"][s][p][0] for p in PHASES) for r in per_rank) for s in range(n)]
    median_step = sorted(range(n), key=lambda s: totals[s])[n // 2]
    phases = {p: [round(1e3 * statistics.median(r["steps"][s][p][k] for r in per_rank for s in range(n)), 2)
                  for k in (0, 1)] for p in PHASES}
    return {"name": lay["name"], "step_ms": round(1e3 * totals[median_step], 2), "phases_ms_wall_cpu": phases,
            "calls_rank0": per_rank[0]["calls"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--world", type=int, default=WORLD, choices=(1, 2, 4, 8), help="gloo ranks")
    args = ap.parse_args()
    lays = [lay for lay in layouts(args.microbatches, False, args.world) if args.only is None or re.search(args.only, lay["name"])]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, MODEL["vocab_size"], size=1 << 17, dtype=np.uint16).tofile(corpus)
        ranks = run_distributed(args.world, worker, lays, str(corpus), args.warmup, args.steps, args.world,
                                timeout=1800)
    out = [summary(lay, [r[i] for r in ranks]) for i, lay in enumerate(lays)]
    for s in out:
        print(f"\n{s['name']}: step {s['step_ms']:.1f} ms; " + ", ".join(
            f"{p} {w:.1f}/{c:.1f}" for p, (w, c) in s["phases_ms_wall_cpu"].items()) + "  (ms wall/CPU, median)")
        for c in s["calls_rank0"]:
            print(f"  {c['op']:<22} n={c['n']} {c['caller']:<44} {c['per_step']:5.1f}/step {c['bytes']:>10.0f} B "
                  f"{c['ms_per_call']:7.2f} ms")
    print(json.dumps({"bench": "step_terms", "world": args.world, "layouts": out, "load_avg_start": load0, "load_avg_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
