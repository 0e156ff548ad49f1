"""Dynamic vs static expert placement, paired in time: blocks of steps under each placement alternate in one run.

Same model as bench/placement_run.py (2 gloo ranks, 1 thread each, pinned; 2 residual MoE layers, d_model 256,
expert hidden 1024, 8 experts, top-2, frozen skewed router: static rank imbalance about 1.68), by default with 4x
its batch (16 x 128 tokens per rank per step, --batch): at 4 x 128 the cold experts get about 80 rows each, and a
CPU computes such small GEMMs about 12 % slower per row than the hot expert's, which the token-count ideal below
does not know about; at 16 x 128 (about 330 rows) it no longer matters.

The protocol differs too. This 2-core box's speed drifts by 10-25 % over seconds for reasons outside it
(bench/machine.py: a fixed matmul loop pinned to one core swings between about 70 and 90 ms per block of 20),
so separate runs of a few seconds per configuration cannot resolve a 20-30 % difference reliably. Here each
configuration is ONE `Trainer.fit`:
  - steps 0..K-1 run the contiguous (static) placement while ExpertPlacementCallback gathers the counts;
  - after step K-1 the callback makes its real decision (all-reduced counts, the policy's planner with this box's
    measured cost figures, the min_gain=0 rule) and migrates;
  - from then on, every K steps, the run swaps between the contiguous placement and that decision (a real
    migration each time, experts and AdamW state), so static and dynamic blocks alternate every few seconds.
A step's time is its slowest rank's (perf_counter between consecutive batch starts). The step with a migration
and the step after it are left out; so are steps 0 and 1. Each dynamic block's median step is compared with the
mean of its neighbouring static blocks' medians: realised = median over dynamic blocks of static / dynamic.

Fairness: the static blocks of a run with extra_slots = k > 0 carry k empty expert slots per rank and layer, which
a user of the static policy would not configure; AdamW still updates them. The bench measures the optimizer's time
per step in the static blocks (from on_before_optimizer_step to the end of the batch) and charges the empty
slots' share of the parameters to the static side: realised_fair uses (static - that) / dynamic, the conservative
figure. (Zero-filling the empty slots' weight gradients, a 2 MiB memset per slot and layer, is not deducted.)

Ideal speedup from the token counts (counts of the static blocks' kept steps, summed per layer):
  ideal  = sum_layers busiest rank's tokens under the contiguous placement / under the decided placement,
  f      = expert fwd+bwd time / step time on the busiest rank in static blocks (median),
  amdahl = 1 / ((1 - f) + f / ideal).
Target (issue 4): at least 80 % of the ideal speedup realised. Verdict: (realised_fair - 1) / (amdahl - 1) >= 0.8;
realised_fair / ideal (the literal token-count reading) is printed beside it.

Run:  .venv/bin/python bench/placement_paired.py                       (about 2-3 min)
      .venv/bin/python bench/placement_paired.py --batch 4 --pairs 10    (placement_run.py's batch, about 1.5 min)
The last line printed is one JSON object with all figures.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import lightning.pytorch as pl  # noqa: E402
from distributed import run_distributed  # noqa: E402
from placement_run import (  # noqa: E402
    CONFIGS,
    THREADS,
    WORLD,
    StepTimer,
    box_hardware,
    make_data,
    max_rank_load,
    measure_figures,
    slowest_steps,
    train,
)

from lightning_smartmoe.callbacks import ExpertPlacementCallback  # noqa: E402
from lightning_smartmoe.placement import Placement  # noqa: E402

TARGET = 0.8


class AlternatingPlacement(ExpertPlacementCallback):
    """ExpertPlacementCallback whose first decision is kept as the dynamic placement; every later decision point
    swaps between the contiguous placement and it instead of planning again."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.static: list[Placement] | None = None
        self.decided: list[Placement] | None = None

    def replan(self, trainer: pl.Trainer, steps: int) -> None:
        layers = self._layers(trainer)
        if self.decided is None:
            self.static = [layer.placement for layer in layers]
            super().replan(trainer, steps)
            self.decided = [layer.placement for layer in layers]
            return
        going_static = layers[0].placement != self.static[0]
        for layer, static, decided in zip(layers, self.static, self.decided):
            want = static if going_static else decided
            if layer.placement != want:
                trainer.strategy.migrate(layer, want)


class OptimizerTimer(StepTimer):
    """StepTimer plus the optimizer's time per step (on_before_optimizer_step to the end of the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer_s: list[float] = []
        self._opt_start = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._opt_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.optimizer_s.append(time.perf_counter() - self._opt_start)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def fit_paired(name: str, cfg: dict, data: torch.Tensor, figures: dict) -> dict:
    policy, extra = CONFIGS[name]
    timer = OptimizerTimer()
    placement = AlternatingPlacement(policy=policy, interval=cfg["block"], window=cfg["window"], min_gain=0.0,
                                     heatmap_every=0, hardware=box_hardware(figures))
    module, _ = train(cfg, data, extra, [timer, placement])
    steps = slowest_steps(timer)
    mine = {"expert_s": [e[0] for e in timer.expert_s], "rows": timer.rows, "optimizer_s": timer.optimizer_s,
            "migration_steps": [m["step"] for m in timer.migrations]}
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    counts = torch.stack(timer.counts)
    dist.all_reduce(counts)
    slot_params = module.moe[0].experts.w1[0].numel() + module.moe[0].experts.w2[0].numel()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "name": name, "policy": policy, "extra_slots": extra,
        "step_s": steps.tolist(),
        "expert_s": [list(x) for x in zip(*[g["expert_s"] for g in gathered])],  # [step][rank]
        "rows": [list(x) for x in zip(*[g["rows"] for g in gathered])],  # [step][rank][layer]
        "optimizer_s": [max(x) for x in zip(*[g["optimizer_s"] for g in gathered])],
        "migration_steps": sorted({s for g in gathered for s in g["migration_steps"]}),
        "counts": counts.tolist(),  # [step][layer][E]
        "placements": [[list(p) for p in step] for step in timer.placements],  # [step][layer][slot]
        "empty_slot_params_share": cfg["layers"] * extra * slot_params / trainable,
        "decided": [list(p.slot_expert) for p in placement.decided or []],
    }


def worker(cfg: dict) -> list[dict] | None:
    torch.set_num_threads(THREADS)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= WORLD:
        os.sched_setaffinity(0, {dist.get_rank()})
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    figures = measure_figures(cfg)
    data = make_data(cfg)
    runs = []
    for name in cfg["configs"]:
        t0 = time.perf_counter()
        runs.append(fit_paired(name, cfg, data, figures))
        if dist.get_rank() == 0:
            print(f"  {name:<10} {time.perf_counter() - t0:5.1f} s", flush=True)
    return [figures, runs] if dist.get_rank() == 0 else None


def summarize(cfg: dict, run: dict) -> dict:
    """Block medians, paired ratios, ideal speedups and the verdict for one configuration's run."""
    E, K, extra = cfg["experts"], cfg["block"], run["extra_slots"]
    contiguous = Placement.contiguous(E, WORLD, extra)
    n = len(run["step_s"])
    excluded = {0, 1} | {s for m in run["migration_steps"] for s in (m, m + 1)}
    blocks: dict[int, dict] = {}
    for i in range(n):
        if i in excluded:
            continue
        static = all(Placement(E, WORLD, tuple(p)) == contiguous for p in run["placements"][i])
        block = blocks.setdefault(i // K, {"static": static, "steps": []})
        assert block["static"] == static, "a block mixes placements"
        block["steps"].append(i)
    def busiest(i: int) -> int:
        rows = [sum(r) for r in run["rows"][i]]
        return max(range(WORLD), key=lambda r: (rows[r], -r))

    medians = {b: statistics.median(run["step_s"][i] for i in v["steps"]) for b, v in blocks.items()}
    expert = {b: statistics.median(run["expert_s"][i][busiest(i)] for i in v["steps"]) for b, v in blocks.items()}
    static_steps = [i for v in blocks.values() if v["static"] for i in v["steps"]]
    optimizer_s = statistics.median(run["optimizer_s"][i] for i in static_steps)
    empty_s = optimizer_s * run["empty_slot_params_share"]
    ratios, fair, expert_ratios = [], [], []
    for b, v in sorted(blocks.items()):
        if v["static"]:
            continue
        around = [c for c in (b - 1, b + 1) if c in blocks and blocks[c]["static"]]
        if around:
            baseline = statistics.fmean(medians[c] for c in around)
            ratios.append(baseline / medians[b])
            fair.append((baseline - empty_s) / medians[b])
            expert_ratios.append(statistics.fmean(expert[c] for c in around) / expert[b])
    if not ratios:
        return {"switched": False, "decided": run["decided"]}
    counts = torch.tensor([run["counts"][i] for i in static_steps], dtype=torch.float64).sum(0)  # [layers, E]
    decided = [Placement(E, WORLD, tuple(p)) for p in run["decided"]]
    static_peak = sum(max_rank_load(contiguous, counts[layer]) for layer in range(cfg["layers"]))
    ideal = static_peak / sum(max_rank_load(p, counts[layer]) for layer, p in enumerate(decided))

    f = statistics.median(run["expert_s"][i][busiest(i)] / run["step_s"][i] for i in static_steps)
    amdahl = 1.0 / ((1.0 - f) + f / ideal)
    realised, realised_fair = statistics.median(ratios), statistics.median(fair)
    q = statistics.quantiles(fair, n=4) if len(fair) > 1 else [fair[0]] * 3
    static_ms = statistics.median(run["step_s"][i] for i in static_steps) * 1e3
    dynamic_ms = statistics.median(run["step_s"][i] for v in blocks.values() if not v["static"] for i in v["steps"]) * 1e3
    return {
        "switched": True,
        "decided": run["decided"],
        "replicas": [p.num_replicas.tolist() for p in decided],
        "pairs": len(ratios),
        "static_step_ms_median": static_ms,
        "dynamic_step_ms_median": dynamic_ms,
        "optimizer_ms_static_median": optimizer_s * 1e3,
        "empty_slot_charge_ms": empty_s * 1e3,
        "realised_speedup": realised,
        "realised_speedup_fair": realised_fair,
        "realised_fair_p25_p75": [q[0], q[2]],
        "ratios_fair_by_pair": fair,
        "expert_fraction_static": f,
        "expert_speedup_busiest_rank": statistics.median(expert_ratios),
        "ideal_speedup_tokens": ideal,
        "ideal_speedup_amdahl": amdahl,
        "gain_fraction_amdahl": (realised_fair - 1) / (amdahl - 1),
        "realised_fair_over_ideal_tokens": realised_fair / ideal,
        "target_met": (realised_fair - 1) / (amdahl - 1) >= TARGET,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dynamic = [name for name in CONFIGS if name != "static"]
    ap.add_argument("--configs", nargs="+", default=dynamic, choices=dynamic)
    ap.add_argument("--pairs", type=int, default=6, help="dynamic blocks per run (each between two static ones)")
    ap.add_argument("--block", type=int, default=6, help="steps per block")
    ap.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per rank per step")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if args.block < 4 or args.pairs < 1:
        ap.error("--block must be >= 4 (2 steps are left out around each switch) and --pairs >= 1")
    steps = args.block * (2 * args.pairs + 1) + 1
    cfg = dict(d_model=256, hidden=1024, experts=8, top_k=2, layers=2, batch=args.batch, seq=128,
               samples=WORLD * args.batch * steps,
               steps=steps, block=args.block, window=2, configs=args.configs, alpha=1.0, beta=4.0, sigma=0.5, lr=1e-4)
    print(f"Paired placement run: {WORLD} gloo ranks, {THREADS} thread each, pinned; {args.batch}x128 tokens per "
          f"rank per step; {steps} steps per config, "
          f"blocks of {args.block}, {args.pairs} dynamic blocks each between static ones; load avg "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    figures, runs = run_distributed(WORLD, worker, cfg, timeout=args.timeout)[0]
    results = {run["name"]: summarize(cfg, run) for run in runs}
    print(f"\ncost figures measured here: expert fwd+bwd {figures['flops_per_s'] / 1e9:.1f} GFLOP/s/rank, gloo "
          f"all_to_all {figures['bandwidth'] / 1e9:.2f} GB/s off-rank per rank")
    print(f"{'config':<10} {'pairs':>5} {'static':>7} {'dynamic':>7} {'empty':>5} {'real':>6} {'fair':>6} "
          f"{'p25-p75':>13} {'f':>5} {'exp x':>5} {'ideal':>6} {'amdahl':>6} {'gain/a':>6} {'r/ideal':>7}  target")
    for name, r in results.items():
        if not r["switched"]:
            print(f"{name:<10} the callback kept the static placement (nothing to compare)")
            continue
        p25, p75 = r["realised_fair_p25_p75"]
        print(f"{name:<10} {r['pairs']:>5} {r['static_step_ms_median']:>7.1f} {r['dynamic_step_ms_median']:>7.1f} "
              f"{r['empty_slot_charge_ms']:>5.1f} {r['realised_speedup']:>6.3f} {r['realised_speedup_fair']:>6.3f} "
              f"{p25:>6.3f}-{p75:<6.3f} {r['expert_fraction_static']:>5.3f} {r['expert_speedup_busiest_rank']:>5.2f} "
              f"{r['ideal_speedup_tokens']:>6.3f} "
              f"{r['ideal_speedup_amdahl']:>6.3f} {r['gain_fraction_amdahl']:>6.3f} "
              f"{r['realised_fair_over_ideal_tokens']:>7.3f}  {'met' if r['target_met'] else 'NOT met'}")
        print(f"{'':<10} decided placement per layer {r['decided']}, replicas {r['replicas']}")
    print("\ncolumns: static, dynamic = median slowest-rank step ms in each kind of block; empty = AdamW time of the "
          "empty slots charged to static; real = median over pairs of static/dynamic; fair = the same with the "
          "empty-slot charge; f = expert share of the static step; exp x = the same pairing of the busiest rank's expert "
          "fwd+bwd time (static/dynamic); ideal = token-count ideal; amdahl = "
          "1/((1-f)+f/ideal); gain/a = (fair-1)/(amdahl-1), verdict >= 0.8; r/ideal = fair/ideal.")
    met = [r["target_met"] for r in results.values() if r["switched"]]
    print(json.dumps({
        "bench": "placement_paired", "world": WORLD, "threads_per_process": THREADS, "block_steps": args.block,
        "batch_per_rank": args.batch, "seq": 128,
        "pairs": args.pairs, "steps_per_config": steps, "figures": figures,
        "target": "(realised_fair - 1) / (amdahl_ideal - 1) >= 0.8 per configuration",
        "target_met": all(met) if met else None,
        "results": results, "wall_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
