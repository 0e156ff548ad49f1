"""smartmoe-replay: replay a recorded expert-load trace through a placement policy and score rank balance.

    python -m lightning_smartmoe.replay trace=PATH ranks=8 placement.policy=balanced placement.extra_slots=2 \
        placement.interval=1

Per layer, the replay starts from the contiguous placement. Before sample s (s >= 1, every placement.interval
samples) it plans from the mean load of the placement.window samples before s, switches if the min_gain rule
agrees, then scores sample s: most-loaded rank's expert tokens / (tokens / ranks). Sample 0 is scored under the
initial placement. With overlap_replica_sync (the strategy's way when each expert slot has one copy per
expert-parallel group), the cost model lets layer l's replica gradient exchange hide under the backward of the
layers before it (CostModel.hiding_layers = l); without it the exchange is charged in full. The last printed
line is one JSON object with all figures.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_smartmoe.config import conf_dir
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.placement import PLANNERS, CostModel, Placement, moves, plan, should_switch

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
    cost: CostModel
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
            ("expert_params", cfg.expert_params, 1, "parameters per expert"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ReplayError(f"{key}={value!r} must be an integer >= {low} ({meaning})")
        min_gain = placement.min_gain
        if isinstance(min_gain, bool) or not isinstance(min_gain, int | float) or math.isnan(min_gain):
            raise ReplayError(f"placement.min_gain={min_gain!r} must be a number of seconds (-inf: always switch)")
        fields = dict(placement.get("cost") or {})
        allowed = ("flops_per_s", "bandwidth", "grad_bytes_per_param", "state_bytes_per_param")
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ReplayError(f"placement.cost.{unknown[0]} is unknown; allowed keys: {', '.join(allowed)}")
        try:
            cost = CostModel(expert_params=cfg.expert_params, **fields)
        except ValueError as err:
            raise ReplayError(f"placement.{err}") from None
        overlap = cfg.get("overlap_replica_sync", True)
        if not isinstance(overlap, bool):
            raise ReplayError(f"overlap_replica_sync={overlap!r} must be true or false")
        return cls(cfg.ranks, placement.policy, placement.interval, placement.window, float(min_gain),
                   placement.extra_slots, cost, overlap)


def load_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a trace -> (expert load [sample, layer, expert] int64, iterations [sample] int64)."""
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
    return load, iterations.astype(np.int64)


def replay(load: np.ndarray, iterations: np.ndarray, settings: ReplaySettings) -> dict:
    """Replay expert load [sample, layer, expert] (iterations [sample]) -> summary figures (see module doc)."""
    samples, layers, experts = load.shape
    loads = torch.as_tensor(load, dtype=torch.float64)
    gaps = np.diff(iterations).tolist()
    gaps.append(gaps[-1])  # training steps each sample stands for
    ratio = torch.zeros(samples, layers, dtype=torch.float64)
    step_s = torch.zeros(samples, layers, dtype=torch.float64)
    switches = remote = local = 0
    migration_s, decision_s = 0.0, []
    for layer in range(layers):
        cost = replace(settings.cost, hiding_layers=layer if settings.overlap_replica_sync else 0)
        current = Placement.contiguous(experts, settings.ranks, settings.extra_slots)
        for s in range(samples):
            if s >= 1 and (s - 1) % settings.interval == 0:
                recent = loads[max(0, s - settings.window) : s, layer].mean(dim=0)
                start = time.perf_counter()
                proposal = plan(settings.policy, recent, current, cost)
                decision_s.append(time.perf_counter() - start)
                horizon = sum(gaps[s : s + settings.interval])
                if should_switch(cost, current, proposal, recent, horizon, settings.min_gain):
                    copies = moves(current, proposal)
                    switches += 1
                    remote += sum(not m.local for m in copies)
                    local += sum(m.local for m in copies)
                    migration_s += cost.migration_time(current, proposal)
                    current = proposal
            actual = loads[s, layer]
            ratio[s, layer] = current.rank_load(actual).max() * settings.ranks / actual.sum()
            step_s[s, layer] = cost.step_time(current, actual)
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
        "max_over_perfect": round(float(ratio.mean()), 6),
        "per_layer": [round(float(x), 6) for x in ratio.mean(dim=0)],
        "switches": switches,
        "moved_experts": remote,
        "local_copies": local,
        "moved_bytes": remote * settings.cost.expert_bytes,
        "overlap_replica_sync": settings.overlap_replica_sync,
        "expert_params": settings.cost.expert_params,
        "decision_ms": round(1e3 * float(np.mean(decision_s)), 4) if decision_s else 0.0,
        "decision_ms_max": round(1e3 * max(decision_s), 4) if decision_s else 0.0,
        "step_ms": round(1e3 * float(step_s.mean()), 6),
        "migration_ms_per_step": round(1e3 * migration_s / (layers * sum(gaps)), 6),
    }


def run(cfg: DictConfig) -> dict:
    """Validate everything, then replay; raises ReplayError before any work if an input is bad."""
    if OmegaConf.is_missing(cfg, "trace"):
        raise ReplayError(f"trace is required: pass trace=PATH to an .npz holding {COUNTS_AXES} and iterations")
    settings = ReplaySettings.from_config(cfg)
    load, iterations = load_trace(cfg.trace)
    experts = load.shape[2]
    if experts % settings.ranks:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        raise ReplayError(f"ranks={settings.ranks} must divide the trace's {experts} experts; allowed: {divisors}")
    return replay(load, iterations, settings)


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
          f"decision {summary['decision_ms']:.3f} ms")
    print("per layer: " + " ".join(f"{x:.3f}" for x in summary["per_layer"]))
    print(json.dumps(summary, allow_nan=False))


if __name__ == "__main__":
    main()
