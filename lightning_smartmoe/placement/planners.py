"""Placement planners: pure, deterministic functions (expert load [E], current placement, cost model) -> placement.

Every rank of a group runs the same planner on the same all-reduced load, so all of them reach the same placement
without talking: no RNG, float64 arithmetic in a fixed order, ties broken by index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from lightning_smartmoe.placement import packing
from lightning_smartmoe.placement.map import Placement
from lightning_smartmoe.placement.online import migration_time, placement_time

if TYPE_CHECKING:  # the planner's cost model comes in as an argument
    from lightning_smartmoe.planner.cost import ExpertLayerCost

Planner = Callable[[torch.Tensor, Placement, "ExpertLayerCost"], Placement]
SLACKS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)  # balanced: rank targets, over the mean rank load, of the node-first packings
CLOSE = 0.01  # balanced: packings within this fraction of the best predicted time count as equally good


def plan_static(load: torch.Tensor, current: Placement, cost: ExpertLayerCost) -> Placement:
    """The contiguous placement with `current`'s shape, whatever the load."""
    extra = current.slots_per_rank - current.num_experts // current.ep
    return Placement.contiguous(current.num_experts, current.ep, extra)


def plan_greedy(load: torch.Tensor, current: Placement, cost: ExpertLayerCost) -> Placement:
    """SmartMoE's online rule: experts by load descending (ties: lower index first), each to the least-loaded rank
    with a free slot among its E/ep base slots (ties: a rank that holds it now, then the lower rank); accepted only
    if the maximum rank load strictly drops, else `current` is kept. One replica per expert."""
    loads = _loads(load, current)
    rank_experts = packing.lpt(packing.Layer(loads, current, current.ep), current.num_experts // current.ep)
    candidate = Placement.from_rank_experts(rank_experts, current.num_experts, current.slots_per_rank, keep=current)
    return candidate if _max_load(candidate, loads) < _max_load(current, loads) else current


def plan_balanced(load: torch.Tensor, current: Placement, cost: ExpertLayerCost) -> Placement:
    """Replicas of hot experts plus permutation over all ep * slots_per_rank slots, chosen by the cost model.

    Candidates (placement/packing.py): the longest-processing-time permutation over all slots, and for each
    slack in SLACKS the node-first packing whose replica counts follow the room each node has left under
    (1 + slack) x the mean rank load, free to move experts between nodes; where the group spans nodes
    (cost.ranks_per_node < ep), for the three smallest slacks also one keeping every expert on the nodes that hold
    it now, the cheap answer to a load that drifts inside nodes (not packed when that cannot come within CLOSE,
    ExpertLayerCost.rows_bound). Each is refined (single-replica moves and
    swaps within a node). Of the distinct candidates, `current` among them, whose predicted step time
    (ExpertLayerCost.layout_time) is within CLOSE of the lowest, each relabelled so that experts stay where they
    are, the one with the shortest migration from `current` wins (then the faster). The winner is returned if its
    max rank load is no higher than greedy's answer and its step time lower; otherwise greedy's answer is.
    """
    loads = _loads(load, current)
    layer = packing.Layer(loads, current, min(current.ep, cost.ranks_per_node))
    spr = current.slots_per_rank
    packings = [lambda: packing.lpt(layer, spr)]
    packings += [lambda slack=slack: packing.by_node(layer, spr, slack, keep=False) for slack in SLACKS]
    keep_from = len(packings)
    if layer.per_node < current.ep:
        packings += [lambda slack=slack: packing.by_node(layer, spr, slack, keep=True) for slack in SLACKS[:3]]
    now = best_time = cost.layout_time(current.rank_experts, loads)
    kept = {_key(current.rank_experts): (now, current.rank_experts)}  # distinct layouts within CLOSE of the best
    for i, pack in enumerate(packings):
        if i == keep_from and cost.rows_bound(packing.kept_floor(layer)) > best_time * (1 + CLOSE):
            break  # keeping every expert on its nodes cannot come close
        rank_experts = packing.refine(pack(), layer.load, spr, layer.groups)
        step = cost.layout_time(rank_experts, layer.load)
        if step <= best_time * (1 + CLOSE):
            kept[_key(rank_experts)] = (step, rank_experts)
            if step < best_time:
                best_time = step
                kept = {key: v for key, v in kept.items() if v[0] <= best_time * (1 + CLOSE)}
    near = []
    for step, rank_experts in kept.values():
        p = Placement.from_rank_experts(packing.align(rank_experts, layer), current.num_experts, spr, current)
        near.append((migration_time(cost, current, p), step, p))
    _, best_time, candidate = min(near, key=lambda x: x[:2])
    peak = _max_load(candidate, loads)
    # Greedy answers `current` or a one-replica layout, whose max rank load is at least `floor`: if the candidate
    # beats both bounds it beats greedy's answer, which need not be computed.
    floor = max(max(loads), sum(loads) / current.ep)
    if peak <= min(floor, _max_load(current, loads)) and best_time < min(cost.rows_bound(floor), now):
        return candidate
    fallback = plan_greedy(load, current, cost)
    no_worse = peak <= _max_load(fallback, loads)
    return candidate if no_worse and placement_time(cost, candidate, loads) < placement_time(cost, fallback, loads) else fallback


PLANNERS: dict[str, Planner] = {"static": plan_static, "greedy": plan_greedy, "balanced": plan_balanced}


def plan(policy: str, load: torch.Tensor, current: Placement, cost: ExpertLayerCost) -> Placement:
    """Dispatch to PLANNERS[policy]."""
    if policy not in PLANNERS:
        raise ValueError(f"placement.policy={policy!r} is unknown; allowed: {', '.join(PLANNERS)}")
    return PLANNERS[policy](load, current, cost)


def _loads(load: torch.Tensor, current: Placement) -> list[float]:
    """Expert load [E] as float64 values, checked."""
    loads = torch.as_tensor(load, dtype=torch.float64).detach().cpu().reshape(-1).tolist()
    if len(loads) != current.num_experts or not all(0 <= x < math.inf for x in loads):
        raise ValueError(f"planner: load must be {current.num_experts} finite values >= 0; got {loads}")
    return loads


def _key(rank_experts: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """The experts of each rank, in order: equal for layouts that differ only in slot order."""
    return tuple(tuple(sorted(experts)) for experts in rank_experts)


def _max_load(placement: Placement, loads: list[float]) -> float:
    """The busiest rank's load, each replica carrying load / replicas."""
    replicas = [len(placement.replicas_of(e)) for e in range(placement.num_experts)]
    return max(sum(loads[e] / replicas[e] for e in experts) for experts in placement.rank_experts)
