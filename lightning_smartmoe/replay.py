"""smartmoe-replay: replay a recorded expert-load trace through a placement policy and score rank balance.

    python -m lightning_smartmoe.replay trace=PATH ranks=8 placement.policy=balanced placement.extra_slots=2 \
        placement.interval=1

Per layer, the replay starts from the contiguous placement. Before sample s (s >= 1, every placement.interval
samples) it plans from the mean load of the placement.window samples before s, switches if the online rule
(placement/online.py: the saving over the placement's expected lifetime, judged on the samples before s, against
the migration) agrees, then scores sample s: the most-loaded rank's expert tokens / (tokens / ranks), and the
planner's cost model's seconds for the layer (planner/cost.py ExpertLayerCost on `hardware`: the busiest rank's
expert compute, its all-to-all traffic, the exposed replica exchange) against perfect balance (every rank the
mean rows, balanced traffic, no exchange). Sample 0 is scored under the initial placement. With
overlap_replica_sync (the strategy's way when each expert slot has one copy per expert-parallel group), layer l's
replica exchange hides under the backward of the layers before it (its first min(l, 2) phases); without it the
exchange is charged in full. The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_smartmoe.config import conf_dir
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.placement import PLANNERS, Placement, SwitchRule, migration_time, moves, placement_time, plan
from lightning_smartmoe.planner.cost import ExpertLayerCost, expert_layer_cost
from lightning_smartmoe.planner.hardware import Hardware, resolve

COUNTS_AXES = "counts[sample, dp_rank, layer, micro_batch, expert]"


class ReplayError(ConfigError):
    """A replay setting or the trace is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ReplaySettings:
    ranks: int
    policy: str
    interval: int  # trace samples between decisions
    window: int  # trace samples averaged per decision
    min_gain: float  # seconds; -inf switches whenever the planner's answer differs
    extra_slots: int
    hardware: Hardware
    d_model: int  # the experts' FFN shape, for the cost model
    expert_hidden: int
    precision: str
    overlap_replica_sync: bool = True  # layer l's replica gradient exchange hides under layers l-1, l-2

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ReplaySettings:
        """Validate the replay config (everything but the trace file)."""
        placement = cfg.placement
        if placement.policy not in PLANNERS:
            raise ReplayError(f"placement.policy={placement.policy!r} is unknown; allowed: {', '.join(PLANNERS)}")
        for key, value, low, meaning in (
            ("ranks", cfg.ranks, 1, "expert-parallel ranks"),
            ("placement.interval", placement.interval, 1, "trace samples between decisions"),
            ("placement.window", placement.window, 1, "trace samples averaged per decision"),
            ("placement.extra_slots", placement.extra_slots, 0, "slots per rank for replicas"),
            ("d_model", cfg.d_model, 1, "the experts' model width"),
            ("expert_hidden", cfg.expert_hidden, 1, "the experts' hidden size"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ReplayError(f"{key}={value!r} must be an integer >= {low} ({meaning})")
        min_gain = placement.min_gain
        if isinstance(min_gain, bool) or not isinstance(min_gain, int | float) or math.isnan(min_gain):
            raise ReplayError(f"placement.min_gain={min_gain!r} must be a number of seconds (-inf: always switch)")
        if cfg.precision not in ("32-true", "64-true", "bf16-mixed", "bf16-true"):
            raise ReplayError(f"precision={cfg.precision!r} is unknown; allowed: 32-true, 64-true, bf16-mixed, bf16-true")
        overlap = cfg.get("overlap_replica_sync", True)
        if not isinstance(overlap, bool):
            raise ReplayError(f"overlap_replica_sync={overlap!r} must be true or false")
        try:
            hardware = resolve(str(cfg.hardware))
        except ConfigError as err:
            raise ReplayError(str(err)) from None
        return cls(cfg.ranks, placement.policy, placement.interval, placement.window, float(min_gain),
                   placement.extra_slots, hardware, cfg.d_model, cfg.expert_hidden, cfg.precision, overlap)

    def cost(self, layer: int, micro: int) -> ExpertLayerCost:
        """Layer `layer`'s cost on the replay's expert-parallel group, `micro` micro-batches per trace step."""
        hidden = layer if self.overlap_replica_sync else 0
        return expert_layer_cost(self.hardware, ParallelSizes(dp=self.ranks, ep=self.ranks), self.d_model,
                                 self.expert_hidden, self.precision, micro, hidden_phases=hidden)


def load_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Read and check a trace -> (expert load [sample, layer, expert] int64, iterations [sample] int64,
    micro-batches per sample)."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"trace={str(path)!r}: no such file; pass trace=PATH to an .npz holding {COUNTS_AXES}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile):
        raise ReplayError(f"trace={str(path)!r}: not a readable .npz archive holding {COUNTS_AXES}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ReplayError(f"trace={str(path)!r}: a single array, expected an .npz archive holding {COUNTS_AXES}")
    with archive:
        for key in ("counts", "iterations"):
            if key not in archive.files:
                raise ReplayError(f"trace: key {key!r} missing (found {sorted(archive.files)}); expected {COUNTS_AXES} "
                                  "as non-negative integers and iterations[sample] as increasing integers")
        counts, iterations = archive["counts"], archive["iterations"]
    if counts.ndim != 5 or 0 in counts.shape:
        raise ReplayError(f"trace: 'counts' has shape {counts.shape}; expected 5 non-empty axes {COUNTS_AXES}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ReplayError(f"trace: 'counts' has dtype {counts.dtype}; expected integer token counts (uint16 or int)")
    if counts.min() < 0:
        raise ReplayError(f"trace: 'counts' has negative entries (min {counts.min()}); token counts must be >= 0")
    samples = counts.shape[0]
    if samples < 2:
        raise ReplayError(f"trace: 'counts' has {samples} sample; the replay needs at least 2 (plan, then score)")
    if (iterations.shape != (samples,) or not np.issubdtype(iterations.dtype, np.integer)
            or (np.diff(iterations) <= 0).any()):
        raise ReplayError(f"trace: 'iterations' has shape {iterations.shape}, dtype {iterations.dtype}; expected "
                          f"{samples} strictly increasing integers (the training step of each sample)")
    load = counts.astype(np.int64).sum(axis=(1, 3))
    idle = np.argwhere(load.sum(axis=2) == 0)
    if len(idle):
        raise ReplayError(f"trace: 'counts' has no tokens at sample {idle[0][0]}, layer {idle[0][1]}; "
                          "every (sample, layer) needs some")
    return load, iterations.astype(np.int64), counts.shape[3]


def replay(load: np.ndarray, iterations: np.ndarray, settings: ReplaySettings, micro: int = 1) -> dict:
    """Replay expert load [sample, layer, expert] (iterations [sample]; `micro` micro-batches per sample) -> summary
    figures (see module doc)."""
    samples, layers, experts = load.shape
    loads = torch.as_tensor(load, dtype=torch.float64)
    gaps = np.diff(iterations).tolist()
    gaps.append(gaps[-1])  # training steps each sample stands for
    ratio = torch.zeros(samples, layers, dtype=torch.float64)
    step_s = torch.zeros(samples, layers, dtype=torch.float64)
    ideal_s = torch.zeros(samples, layers, dtype=torch.float64)
    switches = remote = local = 0
    migration_s, decision_s = 0.0, []
    for layer in range(layers):
        cost = settings.cost(layer, micro)
        rule = SwitchRule(settings.min_gain)
        current = Placement.contiguous(experts, settings.ranks, settings.extra_slots)
        for s in range(samples):
            if s >= 1:
                rule.observe(loads[s - 1, layer])
            if s >= 1 and (s - 1) % settings.interval == 0:
                planned_from = min(settings.window, s)
                recent = loads[s - planned_from : s, layer].mean(dim=0)
                start = time.perf_counter()
                proposal = plan(settings.policy, recent, current, cost)
                decision_s.append(time.perf_counter() - start)
                interval_steps = sum(gaps[s : s + settings.interval])
                if rule.should_switch(cost, current, proposal, planned_from, steps_per_load=gaps[s - 1],
                                     min_steps=interval_steps):
                    copies = moves(current, proposal)
                    switches += 1
                    remote += sum(not m.local for m in copies)
                    local += sum(m.local for m in copies)
                    migration_s += migration_time(cost, current, proposal)
                    current = proposal
            actual = loads[s, layer]
            ratio[s, layer] = current.rank_load(actual).max() * settings.ranks / actual.sum()
            step_s[s, layer] = placement_time(cost, current, actual)
            ideal_s[s, layer] = cost.ideal_time(actual.tolist())
    steps = sum(gaps)
    weights = torch.tensor(gaps, dtype=torch.float64).unsqueeze(1) / steps  # each sample stands for its steps
    step_ms = 1e3 * float((step_s * weights).sum()) / layers
    ideal_ms = 1e3 * float((ideal_s * weights).sum()) / layers
    migration_ms = 1e3 * migration_s / (layers * steps)
    return {
        "policy": settings.policy,
        "ranks": settings.ranks,
        "experts": experts,
        "layers": layers,
        "samples": samples,
        "extra_slots": settings.extra_slots,
        "interval": settings.interval,
        "window": settings.window,
        "min_gain": settings.min_gain if math.isfinite(settings.min_gain) else str(settings.min_gain),
        "hardware": settings.hardware.name,
        "max_over_perfect": round(float(ratio.mean()), 6),
        "per_layer": [round(float(x), 6) for x in ratio.mean(dim=0)],
        "switches": switches,
        "moved_experts": remote,
        "local_copies": local,
        "moved_bytes": round(remote * cost.state_bytes),
        "overlap_replica_sync": settings.overlap_replica_sync,
        "decision_ms": round(1e3 * float(np.mean(decision_s)), 4) if decision_s else 0.0,
        "decision_ms_max": round(1e3 * max(decision_s), 4) if decision_s else 0.0,
        "step_ms": round(step_ms, 6),
        "migration_ms_per_step": round(migration_ms, 6),
        "total_ms_per_step": round(step_ms + migration_ms, 6),
        "ideal_step_ms": round(ideal_ms, 6),
        "total_over_ideal": round((step_ms + migration_ms) / ideal_ms, 6),
    }


def run(cfg: DictConfig) -> dict:
    """Validate everything, then replay; raises ReplayError before any work if an input is bad."""
    if OmegaConf.is_missing(cfg, "trace"):
        raise ReplayError(f"trace is required: pass trace=PATH to an .npz holding {COUNTS_AXES} and iterations")
    settings = ReplaySettings.from_config(cfg)
    load, iterations, micro = load_trace(cfg.trace)
    experts = load.shape[2]
    if experts % settings.ranks:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        raise ReplayError(f"ranks={settings.ranks} must divide the trace's {experts} experts; allowed: {divisors}")
    return replay(load, iterations, settings, micro)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="replay")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except ReplayError as err:
        print(f"smartmoe-replay: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{summary['policy']} on {summary['ranks']} ranks, {summary['experts']} experts, "
          f"{summary['layers']} layers x {summary['samples']} samples: max/perfect {summary['max_over_perfect']:.4f}, "
          f"{summary['switches']} switches, {summary['moved_experts']} experts moved, "
          f"{summary['total_ms_per_step']:.3f} ms per step with migration = {summary['total_over_ideal']:.3f}x perfect "
          f"balance ({summary['ideal_step_ms']:.3f} ms), decision {summary['decision_ms']:.3f} ms")
    print("per layer: " + " ".join(f"{x:.3f}" for x in summary["per_layer"]))
    print(json.dumps(summary, allow_nan=False))


if __name__ == "__main__":
    main()
