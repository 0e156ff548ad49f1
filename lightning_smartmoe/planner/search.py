"""SmartMoE's offline stage: every valid layout of a world, priced by the cost model (planner/cost.py) on a
workload's expert loads, pruned by the memory model, ranked by expected step time.

The search space: dp x tp x pp = world (tp within a node), ep dividing the experts and the ranks that split them,
expert_tp and sequence_parallel where tp > 1, micro-batches from pp (1 without a pipeline) up to the per-rank
batch in powers of two, every pipeline schedule (interleaved with 2 virtual stages where the layers allow), and
for each a placement policy and slot budget: static, greedy (SmartMoE's permutation) and balanced with 1 or 2
extra slots, and ZeRO stage 0, 1 or 2 where something is data-parallel (dp or edp > 1). Recomputation is not
searched: the model's `recompute` is priced as configured. A plan's time is the mean over the workload's samples of
CostModel.step, each MoE layer under the
placement its policy picks from the load before the sample (the online stage's view: it plans from what it has
seen), plus the migration between consecutive picks spread over the steps between samples (every switch taken:
an upper bound of the online rule's). Placements are planned once per (ep, expert shard, policy, slots, sample,
layer), under the first such layout's rows and cost, and priced under each layout's own.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models import ModelConfig
from lightning_smartmoe.placement import Placement, migration_time, plan
from lightning_smartmoe.planner.cost import Breakdown, CostModel, LayerPlacement
from lightning_smartmoe.planner.memory import Layout

SAMPLES = 4  # workload samples a plan is scored on (evenly spaced over a trace)
POLICIES = (("static", 0), ("greedy", 0), ("balanced", 1), ("balanced", 2))
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class Workload:
    """Expert loads: fractions [sample, layer, E] of a layer's routed rows per expert (each row sums to 1), and
    the training steps each sample stands for [sample]."""

    name: str
    fractions: np.ndarray
    steps: np.ndarray

    def layer(self, sample: int, moe_layer: int) -> np.ndarray:
        """[E] of the model's `moe_layer`-th MoE layer (the workload's layers repeat when the model has more)."""
        return self.fractions[sample, moe_layer % self.fractions.shape[1]]

    def scored(self) -> list[int]:
        """The samples a plan is scored on: up to SAMPLES, evenly spaced, each with a sample before it when the
        workload has several."""
        n = self.fractions.shape[0]
        if n == 1:
            return [0]
        return sorted({int(round(x)) for x in np.linspace(1, n - 1, min(SAMPLES, n - 1))})


def _normalised(loads: np.ndarray, where: str) -> np.ndarray:
    totals = loads.sum(axis=-1, keepdims=True)
    if (totals <= 0).any():
        raise ConfigError(f"{where}: a (sample, layer) has no tokens; every one needs some")
    return loads / totals


def workload(spec: str, num_experts: int) -> Workload:
    """`workload=`: uniform, zipf:S (expert i gets a share proportional to 1 / (i + 1)^S), trace:PATH (the npz of
    ../shared/traces/) or csv:PATH (an expert_load.csv written by training). ConfigError naming what is wrong."""
    allowed = "uniform, zipf:S (S >= 0), trace:PATH (.npz) or csv:PATH (expert_load.csv)"
    kind, _, arg = str(spec).partition(":")
    if kind == "uniform" and not arg:
        return Workload("uniform", np.full((1, 1, num_experts), 1.0 / num_experts), np.ones(1))
    if kind == "zipf":
        try:
            s = float(arg)
        except ValueError:
            s = math.nan
        if not s >= 0 or math.isinf(s):
            raise ConfigError(f"workload={spec!r}: zipf needs an exponent S >= 0, e.g. zipf:1.2")
        share = 1.0 / np.arange(1, num_experts + 1) ** s
        return Workload(spec, (share / share.sum())[None, None], np.ones(1))
    if kind == "trace" and arg:
        from lightning_smartmoe.replay import ReplayError, load_trace

        try:
            load, iterations, _ = load_trace(arg)
        except ReplayError as err:
            raise ConfigError(f"workload={spec!r}: {err}") from None
        steps = np.diff(iterations, append=iterations[-1] + (iterations[-1] - iterations[-2]))
        fractions = load.astype(np.float64)
    elif kind == "csv" and arg:
        fractions, steps = _read_csv(Path(arg), spec)
    else:
        raise ConfigError(f"workload={spec!r} is unknown; allowed: {allowed}")
    return Workload(spec, _regrouped(_normalised(fractions, f"workload={spec!r}"), num_experts, spec), steps.astype(np.float64))


def _regrouped(fractions: np.ndarray, num_experts: int, spec: str) -> np.ndarray:
    """A recorded load [sample, layer, E'] for a model of `num_experts` experts: E' itself; for fewer experts each
    takes the rows of E' / E consecutive recorded ones (their union); for more, each recorded expert's rows split
    evenly over E / E' (an assumption: how they would split is not recorded)."""
    recorded = fractions.shape[2]
    if recorded == num_experts:
        return fractions
    if recorded % num_experts == 0:
        return fractions.reshape(*fractions.shape[:2], num_experts, recorded // num_experts).sum(axis=3)
    if num_experts % recorded == 0:
        return np.repeat(fractions, num_experts // recorded, axis=2) / (num_experts // recorded)
    raise ConfigError(f"workload={spec!r} has {recorded} experts; moe.num_experts={num_experts} must divide or be a "
                      "multiple of it")


def _read_csv(path: Path, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """expert_load.csv (step, layer, expert0 ... expertN-1 per row) -> (loads [sample, layer, E], steps [sample])."""
    if not path.is_file():
        raise ConfigError(f"workload={spec!r}: no such file")
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        if header[:2] != ["step", "layer"] or len(header) < 3 or not body:
            raise ValueError("header")
        table: dict[int, dict[int, list[float]]] = {}
        for row in body:
            values = [float(v) for v in row[2:]]
            if len(values) != len(header) - 2 or any(not v >= 0 for v in values):
                raise ValueError("row")
            table.setdefault(int(row[0]), {})[int(row[1])] = values
    except (ValueError, IndexError, UnicodeDecodeError, OSError):
        raise ConfigError(f"workload={spec!r}: not an expert_load.csv (columns step, layer, expert0, ...; counts >= 0 "
                          "on every row)") from None
    steps = sorted(table)
    layers = sorted({layer for by_layer in table.values() for layer in by_layer})
    if any(sorted(table[s]) != layers for s in steps):
        raise ConfigError(f"workload={spec!r}: every step must list the same layers")
    loads = np.array([[table[s][layer] for layer in layers] for s in steps])
    gaps = np.diff(steps).tolist() or [1]
    return loads, np.array(gaps + [gaps[-1]])


@dataclass(frozen=True)
class Plan:
    layout: Layout
    policy: str
    step_s: float
    memory_bytes: int
    breakdown: Breakdown

    def as_dict(self) -> dict:
        sizes, layout = self.layout.sizes, self.layout
        return {
            "dp": sizes.dp, "tp": sizes.tp, "pp": sizes.pp, "ep": sizes.ep, "expert_tp": sizes.expert_tp,
            "sequence_parallel": layout.sequence_parallel, "microbatches": layout.microbatches,
            "pp_schedule": layout.pp_schedule, "virtual_stages": layout.virtual_stages, "zero": layout.zero,
            "policy": self.policy, "extra_slots": layout.extra_slots, "step_ms": round(self.step_s * 1e3, 4),
            "memory_mb": round(self.memory_bytes / 2**20, 1),
            "breakdown": {k: round(v * 1e3, 4) for k, v in self.breakdown.as_dict().items()},
        }

    def overrides(self) -> dict[str, dict]:
        """The plan as smartmoe-train's parallel.* and placement.* keys."""
        d = self.as_dict()
        parallel = {k: d[k] for k in ("dp", "tp", "pp", "ep", "expert_tp", "sequence_parallel", "microbatches",
                                      "pp_schedule", "virtual_stages", "zero")}
        return {"parallel": parallel, "placement": {"policy": self.policy, "extra_slots": self.layout.extra_slots}}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: ModelConfig, world: int, gpus_per_node: int, global_batch: int, precision: str,
            accumulate: int = 1) -> Iterator[Layout]:
    """Every valid layout of `world` ranks (module docstring), slots not yet chosen (extra_slots 0)."""
    E = cfg.moe.num_experts
    for tp in (t for t in _divisors(world) if t <= gpus_per_node):
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            if global_batch % (dp * accumulate):
                continue
            per_rank = global_batch // (dp * accumulate)  # sequences per rank and forward
            for expert_tp in ((False, True) if tp > 1 else (False,)):
                plane = dp if expert_tp else dp * tp
                for ep in (e for e in _divisors(E) if plane % e == 0):
                    sizes = ParallelSizes(dp=dp, tp=tp, pp=pp, ep=ep, expert_tp=expert_tp)
                    for schedule, virtual in _schedules(cfg, pp):
                        try:
                            cfg.check_parallel(tp, pp, expert_tp, virtual)
                        except ConfigError:
                            continue
                        for m in _microbatches(pp, per_rank, schedule):
                            for sp in ((False, True) if tp > 1 else (False,)):
                                for zero in ((0, 1, 2) if sizes.dp > 1 or sizes.edp > 1 else (0,)):
                                    yield Layout(sizes, microbatches=m, pp_schedule=schedule, virtual_stages=virtual,
                                                 sequence_parallel=sp, zero=zero, precision=precision,
                                                 accumulate=accumulate, global_batch=global_batch)


def _schedules(cfg: ModelConfig, pp: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = [("gpipe", 1), ("1f1b", 1)]
    if cfg.n_layers % (2 * pp) == 0:
        out.append(("interleaved_1f1b", 2))
    return out


def _microbatches(pp: int, per_rank: int, schedule: str) -> list[int]:
    if pp == 1:
        return [1]
    low = 1 if schedule == "gpipe" else pp
    out, m = [], 1
    while m <= per_rank:
        if m >= low and per_rank % m == 0 and (schedule != "interleaved_1f1b" or m % max(1, m // pp) == 0):
            out.append(m)
        m *= 2
    return out


class Search:
    """Plans of one model on one machine for one workload (module docstring)."""

    def __init__(self, cfg: ModelConfig, model: CostModel, load: Workload) -> None:
        self.cfg, self.model, self.load = cfg, model, load
        self.moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        # under a capacity factor an expert computes at most cf / E of the routed rows; the rest are dropped
        self.cap = cfg.moe.capacity_factor / cfg.moe.num_experts if cfg.moe.capacity_factor is not None else 1.0
        self._placements: dict[tuple, list[dict[int, tuple[tuple[int, ...], ...]]]] = {}
        self._migration: dict[tuple, float] = {}
        self._tuples: dict[tuple, tuple[float, ...]] = {}

    def rows(self, sample: int, j: int, rows: float) -> np.ndarray:
        """[E] rows per step each expert of the j-th MoE layer computes out of `rows` routed, capacity applied."""
        return np.minimum(self.load.layer(sample, j), self.cap) * rows

    def _fractions(self, sample: int, j: int) -> tuple[float, ...]:
        """rows(sample, j, 1) as a tuple, built once (the cost model caches by it)."""
        key = (sample, j)
        if key not in self._tuples:
            self._tuples[key] = tuple(self.rows(sample, j, 1.0).tolist())
        return self._tuples[key]

    @staticmethod
    def _key(layout: Layout, policy: str) -> tuple:
        sizes = layout.sizes
        return sizes.ep, sizes.expert_tp, sizes.tp if sizes.expert_tp else 1, policy, layout.extra_slots

    def _picks(self, layout: Layout, policy: str) -> list[dict[int, tuple[tuple[int, ...], ...]]]:
        """Per scored sample, each MoE layer's placement (the experts of each rank) under `policy`, planned from the
        sample before, on the rows and cost of the first layout priced with this (ep, expert shard, policy, slots);
        and the migration per step between consecutive samples' picks."""
        key = self._key(layout, policy)
        if key in self._placements:
            return self._placements[key]
        cost, rows = self.model.expert_layer(layout), self.model.rows_per_step(layout)
        start = Placement.contiguous(self.cfg.moe.num_experts, layout.sizes.ep, layout.extra_slots)

        @functools.cache  # a sample's pick serves its own scoring and the migration after the next sample
        def pick(sample: int, j: int) -> Placement:
            return plan(policy, torch.as_tensor(self.rows(sample, j, rows)), start, cost)

        picks, migration, steps = [], 0.0, 0.0
        for s in self.load.scored():
            now = {j: pick(max(0, s - 1), j) for j in range(len(self.moe_layers))}
            picks.append({i: now[j].rank_experts for j, i in enumerate(self.moe_layers)})
            if s >= 2 and policy != "static":
                migration += sum(migration_time(cost, pick(s - 2, j), now[j]) for j in now)
                steps += float(self.load.steps[s - 1])
        self._placements[key] = picks
        self._migration[key] = migration / steps if steps else 0.0
        return picks

    def score(self, layout: Layout, policy: str) -> Plan:
        """The plan's expected step time over the workload, migration included, and its memory."""
        picks = self._picks(layout, policy)
        rows = self.model.rows_per_step(layout)
        total = Breakdown()
        for sample, chosen in zip(self.load.scored(), picks):
            placements = {i: LayerPlacement(chosen[i], self._fractions(sample, j), rows)
                          for j, i in enumerate(self.moe_layers)}
            total = total + self.model.step(layout, placements)
        mean = total.scaled(1 / len(picks)) + Breakdown(migration=self._migration[self._key(layout, policy)])
        return Plan(layout, policy, mean.step_s, self.model.memory(layout).total_bytes, mean)

    def run(self, world: int, gpus_per_node: int, global_batch: int, precision: str, memory_gb: float | None,
            policies: Sequence[tuple[str, int]] = POLICIES, accumulate: int = 1) -> tuple[list[Plan], int, int]:
        """(plans best first, layouts enumerated, layouts refused for memory)."""
        plans, seen, refused = [], 0, 0
        for base in layouts(self.cfg, world, gpus_per_node, global_batch, precision, accumulate=accumulate):
            seen += 1
            for policy, slots in policies:
                layout = replace(base, extra_slots=slots)
                if memory_gb is not None and self.model.memory(layout).total_bytes > memory_gb * 2**30:
                    refused += 1
                    continue
                plans.append(self.score(layout, policy))
        plans.sort(key=lambda p: (p.step_s, p.memory_bytes))  # equal times: the one needing less memory
        return plans, seen, refused


def search(cfg: ModelConfig, model: CostModel, load: Workload, world: int, global_batch: int, precision: str,
           memory_gb: float | None, policies: Sequence[tuple[str, int]] = POLICIES, accumulate: int = 1) -> dict:
    """Run the search; ConfigError if no layout of `world` is valid or fits. Returns {"plans", "layouts",
    "refused_for_memory", "search_s"}."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world={world!r} must be an integer >= 1 (GPUs to plan for)")
    start = time.perf_counter()
    plans, seen, refused = Search(cfg, model, load).run(world, model.hardware.gpus_per_node, global_batch, precision,
                                                        memory_gb, policies, accumulate)
    if not plans:
        why = (f"all {seen} layouts need more than memory_gb={memory_gb} GiB per rank" if seen else
               f"none of dp x tp x pp = {world} fits the model (tp <= {model.hardware.gpus_per_node} GPUs per node "
               f"dividing heads and vocab, pp dividing the layers, dp x accumulation dividing "
               f"data.global_batch_size={global_batch})")
        raise ConfigError(f"world={world}: no layout to plan: {why}")
    return {"plans": plans, "layouts": seen, "refused_for_memory": refused, "search_s": time.perf_counter() - start}
