"""The per-step work around the model: logging every step, a barrier before each reduce and torch's per-tensor
AdamW (before) against logging only on the steps the loggers write, one all-reduce per reduce and fused AdamW
(now), in one spawn of 4 gloo ranks.

The model, batch and layouts of bench/layouts.py (CPU, fp32, 1 thread per rank). Per layout (--only: a regex on the
names) and --rounds times in turn (before, now, now, before, ...), one `Trainer.fit` of --warmup + --steps steps:
  before  log_every_n_steps=1 (train/loss, train/ppl and the MoE statistics with their world all-reduce every step,
          as every step did before), a barrier before each of the strategy's reduces (as Lightning's reduce does)
          and torch.optim.AdamW's default (a loop over the tensors on CPU);
  now     log_every_n_steps=50 (the MoE statistics and train/ppl skipped on the timed steps), the strategy's
          reduce and the module's fused AdamW.
Before the spawn, in this process (1 thread): one AdamW step over the model's parameters (random gradients), the
three ways torch offers (the per-tensor loop, foreach, fused), --rounds alternations of 20 steps after 3 each.
A step is its slowest rank's on_train_batch_start..end wall time; a case's figure is the median over its timed
steps and rounds (each fit's median is in the JSON, in the order they ran). Each mode also reports the median
process-CPU time per step of its busiest rank.

Run:  .venv/bin/python bench/step_overhead.py [--only 'dp4.tp1.pp1.ep1$|dp2.tp1.pp2.ep2.1f1b$'] [--rounds 3]
Printed: one line per layout, then as the last line one JSON object with all figures.
"""

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
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
from machine import cpu_pressure, cpu_times, steal_share  # noqa: E402

from lightning_smartmoe import SmartMoEStrategy  # noqa: E402
from lightning_smartmoe.data import TokenDataModule  # noqa: E402
from lightning_smartmoe.models import MoELMModule, OptimConfig  # noqa: E402

OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
MODES = {"before": 1, "now": 50}  # log_every_n_steps


class LoopAdamW(MoELMModule):
    """The module with torch.optim.AdamW's default implementation (the loop over tensors on CPU)."""

    def configure_optimizers(self):
        found = super().configure_optimizers()
        for group in found["optimizer"].param_groups:
            group["fused"] = None
        return found


class BarrierReduce(SmartMoEStrategy):
    """The strategy with a barrier before each reduce's all-reduce."""

    def reduce(self, tensor, group=None, reduce_op="mean"):
        if isinstance(tensor, torch.Tensor):
            dist.barrier(group=group)
        return super().reduce(tensor, group, reduce_op)


class StepClock(pl.Callback):
    """Wall and process-CPU seconds of each step after `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))


def fit(lay: dict, mode: str, corpus: str, warmup: int, steps: int) -> list[tuple[float, float]]:
    pl.seed_everything(0, verbose=False)
    clock = StepClock(warmup)
    strategy = (BarrierReduce if mode == "before" else SmartMoEStrategy)(
        dp=lay["dp"], tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], expert_tp=lay["expert_tp"],
        microbatches=lay["microbatches"], virtual_stages=lay["virtual_stages"],
        pp_schedule=lay["schedule"] if lay["pp"] > 1 else "1f1b")
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, max_steps=warmup + steps, strategy=strategy, gradient_clip_val=1.0,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock], log_every_n_steps=MODES[mode],
    )
    dm = TokenDataModule(corpus, seq_len=MODEL["seq_len"], global_batch_size=GLOBAL_BATCH,
                         vocab_size=MODEL["vocab_size"])
    trainer.fit((LoopAdamW if mode == "before" else MoELMModule)(model_config(), OPTIM), dm)
    return clock.steps


def adamw_step_ms(rounds: int) -> dict[str, list[float]]:
    """ms per AdamW step over the model's parameters, per implementation and alternation."""
    torch.set_num_threads(THREADS)
    params = list(model_config().build().parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    found: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, kw in (("loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
            opt = torch.optim.AdamW(params, lr=1e-3, **kw)
            for _ in range(3):
                opt.step()
            t0 = time.perf_counter()
            for _ in range(20):
                opt.step()
            found.setdefault(name, []).append(round((time.perf_counter() - t0) / 20 * 1e3, 2))
    return found


def worker(runs: list[tuple[dict, str]], corpus: str, warmup: int, steps: int) -> list[list[tuple[float, float]]]:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    return [fit(lay, mode, corpus, warmup, steps) for lay, mode in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=r"dp4.tp1.pp1.ep1$|dp2.tp2.pp1.ep2$|dp2.tp1.pp2.ep2.1f1b$")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    lays = [lay for lay in layouts(4, False) if re.search(args.only, lay["name"])]
    if not lays:
        sys.exit(f"--only={args.only!r} matches no layout of bench/layouts.py")
    order = [m for r in range(args.rounds) for m in (("before", "now") if r % 2 == 0 else ("now", "before"))]
    runs = [(lay, mode) for lay in lays for mode in order]
    load0, pressure0, ticks0, t0 = os.getloadavg()[0], cpu_pressure(), cpu_times(), time.time()
    adamw = adamw_step_ms(args.rounds)
    print("AdamW step over the model's parameters, ms: " + ", ".join(f"{k} {v}" for k, v in adamw.items()))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, MODEL["vocab_size"], size=1 << 17, dtype=np.uint16).tofile(corpus)
        ranks = run_distributed(WORLD, worker, runs, str(corpus), args.warmup, args.steps, timeout=1800)
    cases = []
    for i, lay in enumerate(lays):
        figures = {}
        for mode in MODES:
            idx = [k for k, (l, m) in enumerate(runs) if l is lay and m == mode]
            steps = [(max(r[k][s][0] for r in ranks), max(r[k][s][1] for r in ranks))
                     for k in idx for s in range(args.steps)]
            figures[mode] = {"step_ms": round(1e3 * statistics.median(w for w, _ in steps), 1),
                             "cpu_ms": round(1e3 * statistics.median(c for _, c in steps), 1)}
        speedup = figures["before"]["step_ms"] / figures["now"]["step_ms"]
        cases.append({"layout": lay["name"], **figures, "speedup": round(speedup, 3)})
        before, now = figures["before"], figures["now"]
        print(f"{lay['name']:<28} before {before['step_ms']:7.1f} ms (CPU {before['cpu_ms']:6.1f})"
              f"   now {now['step_ms']:7.1f} ms (CPU {now['cpu_ms']:6.1f})   {speedup:.3f}x")
    in_order = [{"layout": lay["name"], "mode": mode,
                 "step_ms": round(1e3 * statistics.median(max(r[k][s][0] for r in ranks)
                                                          for s in range(args.steps)), 1)}
                for k, (lay, mode) in enumerate(runs)]
    print(json.dumps({"bench": "step_overhead", "world": WORLD, "threads_per_process": THREADS, "rounds": args.rounds,
                      "warmup": args.warmup, "steps": args.steps, "cases": cases,
                      "fits_in_order": in_order, "adamw_step_ms": adamw,
                      "geomean_speedup": round(float(np.exp(np.mean([np.log(c["speedup"]) for c in cases]))), 3),
                      "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
                      "cpu_pressure_avg10_start": pressure0, "cpu_pressure_avg10_end": cpu_pressure(),
                      "cpu_steal_share": steal_share(ticks0),
                      "wall_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
