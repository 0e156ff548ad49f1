"""Placement planners: pure, deterministic functions (expert load [E], current placement, cost model) -> placement.

Every rank of a group runs the same planner on the same all-reduced load, so all of them reach the same placement
without talking: no RNG, float64 arithmetic in a fixed order, ties broken by index.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from lightning_smartmoe.placement.map import Placement, moves
from lightning_smartmoe.placement.online import placement_time

if TYPE_CHECKING:  # the planner's cost model comes in as an argument
    from lightning_smartmoe.planner.cost import ExpertLayerCost

Planner = Callable[[torch.Tensor, Placement, "ExpertLayerCost"], Placement]
SPLIT_TARGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25)  # balanced: of the mean rank load
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
    rank_experts = _pack(loads, [1] * current.num_experts, current.num_experts // current.ep, current)
    candidate = Placement.from_rank_experts(rank_experts, current.num_experts, current.slots_per_rank, keep=current)
    return candidate if _max_load(candidate, loads) < _max_load(current, loads) else current


def plan_balanced(load: torch.Tensor, current: Placement, cost: ExpertLayerCost) -> Placement:
    """Replicas of hot experts plus permutation over all ep * slots_per_rank slots, chosen by the cost model.

    Candidate replica counts come from one sequence: extra replicas go one at a time to the expert with the largest
    load per replica (at most one replica per rank, ties: lower index); it is cut where that largest load first
    falls to each fraction SPLIT_TARGETS of the mean rank load, and where the slots run out. Each candidate is
    packed: replicas by load per replica descending onto the least-loaded rank with a free slot that does not hold
    the expert yet (ties: a rank that holds it now, then the lower rank). Of the packings whose predicted step time
    (ExpertLayerCost.layout_time) is within CLOSE of the lowest, the one that moves the fewest experts away from
    `current` wins (then the faster); candidates whose ExpertLayerCost.time_bound cannot come that close are not
    packed. The winner is returned if its max rank load is no higher than greedy's answer and its step time
    lower; otherwise greedy's answer is.
    """
    loads = _loads(load, current)
    load_list = loads.tolist()
    spr = current.slots_per_rank
    options = _replica_options(loads, current.ep, current.ep * spr)
    best_time, packed = float("inf"), []
    for bound, _, replicas in sorted((cost.time_bound(r, load_list, current.ep), i, r) for i, r in enumerate(options)):
        if bound > best_time * (1 + CLOSE):  # this and all later options cannot come close
            break
        rank_experts = _pack(loads, replicas, spr, current, cost)
        step = cost.layout_time(rank_experts, load_list)
        packed.append((step, Placement.from_rank_experts(rank_experts, current.num_experts, spr, current)))
        best_time = min(best_time, step)
    near = [(sum(not m.local for m in moves(current, p)), step, p) for step, p in packed if step <= best_time * (1 + CLOSE)]
    _, best_time, candidate = min(near, key=lambda x: x[:2])
    peak = _max_load(candidate, loads)
    # Greedy answers `current` or a one-replica layout, whose max rank load is at least `floor`: if the candidate
    # beats both bounds it beats greedy's answer, which need not be computed.
    floor = max(max(load_list), sum(load_list) / current.ep)
    if peak <= min(floor, _max_load(current, loads)) and best_time < min(
        cost.token_time * floor, placement_time(cost, current, loads)
    ):
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


def _loads(load: torch.Tensor, current: Placement) -> torch.Tensor:
    loads = torch.as_tensor(load, dtype=torch.float64).detach().cpu().reshape(-1)
    if loads.numel() != current.num_experts or bool((loads < 0).any()) or not bool(torch.isfinite(loads).all()):
        raise ValueError(f"planner: load must be {current.num_experts} finite values >= 0; got {loads.tolist()}")
    return loads


def _max_load(placement: Placement, loads: torch.Tensor) -> float:
    return float(placement.rank_load(loads).max())


def _replica_options(loads: torch.Tensor, ep: int, budget: int) -> list[list[int]]:
    """Candidate replica counts [E] (see plan_balanced): none, then the first count at which the largest load per
    replica is at most each SPLIT_TARGETS fraction of the mean, and the count where `budget` slots or the ranks
    run out first; duplicates dropped."""
    load = loads.tolist()
    mean = sum(load) / ep
    replicas = [1] * len(load)
    options = [list(replicas)]
    heap = [(-x, e) for e, x in enumerate(load) if ep > 1 and x > 0]
    heapq.heapify(heap)
    targets = [c * mean for c in SPLIT_TARGETS]
    saturated = 0.0  # largest load per replica among experts already on every rank
    used = len(load)
    while heap and targets and used < budget:
        _, e = heapq.heappop(heap)
        replicas[e] += 1
        used += 1
        if replicas[e] < ep:
            heapq.heappush(heap, (-load[e] / replicas[e], e))
        else:
            saturated = max(saturated, load[e] / ep)
        largest = max(saturated, -heap[0][0] if heap else 0.0)
        if largest <= targets[0]:
            options.append(list(replicas))
            targets = [t for t in targets if largest > t]
    if options[-1] != replicas:
        options.append(list(replicas))
    return options


def _pack(loads: torch.Tensor, replicas: Sequence[int], capacity: int, current: Placement,
          cost: ExpertLayerCost | None = None) -> list[list[int]]:
    """Longest-processing-time packing (see plan_balanced) of each expert's replicas, load / replicas each, onto
    distinct ranks with fewer than `capacity` experts. Returns the experts of each rank. An expert gets fewer
    replicas only if fewer ranks have room for it.

    Where the group spans nodes (cost.ranks_per_node < ep) and an expert's replicas would too, they may instead go
    to the least-loaded ranks of one of the nodes they touch: of those choices, the one whose busiest chosen rank
    finishes first, its rows (cost.row_s each) plus the expert's gradient exchange over the link it would use
    (ExpertLayerCost.exchange_time), wins; ties: one node, then the lower node."""
    load = loads.tolist()
    ep, spr = current.ep, current.slots_per_rank
    per_node = min(ep, cost.ranks_per_node) if cost is not None else ep
    home: list[list[int]] = [[] for _ in load]
    for slot, e in enumerate(current.slot_expert):
        if e >= 0:
            home[e].append(slot // spr)
    rank_load = [0.0] * ep
    version = [0] * ep  # a heap entry (load, rank, version) is stale once its rank's version moved on
    heap = [(0.0, r, 0) for r in range(ep)]
    rank_experts: list[list[int]] = [[] for _ in range(ep)]

    for e in sorted(range(len(load)), key=lambda e: (-load[e] / replicas[e], e)):
        taken: list[int] = []
        while heap and len(taken) < replicas[e]:
            _, r, v = heapq.heappop(heap)
            if v == version[r] and r not in taken:  # a rank put back below may have two live entries
                taken.append(r)
        if not taken:
            break
        edge = rank_load[taken[-1]]  # tie rule: ranks as loaded as the last one taken yield to home ranks
        tied_homes = [h for h in home[e] if h not in taken and rank_load[h] == edge and len(rank_experts[h]) < capacity]
        for h in tied_homes:
            strangers = [r for r in taken if rank_load[r] == edge and r not in home[e]]
            if not strangers:
                break
            taken.remove(strangers[-1])
            heapq.heappush(heap, (edge, strangers[-1], version[strangers[-1]]))
            taken.append(h)
        if 1 < len(taken) <= per_node and len({r // per_node for r in taken}) > 1:
            k, best = len(taken), taken
            # the busiest chosen rank's finish, in rows: the exchange over each link counted as rows of compute
            best_rows = max(rank_load[r] for r in taken) + cost.exchange_time(k, True) / cost.row_s
            intra_rows = cost.exchange_time(k, False) / cost.row_s
            for first in sorted({r // per_node * per_node for r in taken}):  # inside one of the nodes it touched
                room = [(rank_load[r], r) for r in range(first, min(ep, first + per_node)) if len(rank_experts[r]) < capacity]
                if len(room) >= k:
                    local = heapq.nsmallest(k, room)
                    if local[-1][0] + intra_rows <= best_rows:
                        best, best_rows = [r for _, r in local], local[-1][0] + intra_rows
            if best is not taken:
                for r in taken:  # back in the heap; the ranks taken instead retire their entries below
                    heapq.heappush(heap, (rank_load[r], r, version[r]))
                taken = best
        for r in taken:
            rank_load[r] += load[e] / len(taken)
            rank_experts[r].append(e)
            version[r] += 1
            if len(rank_experts[r]) < capacity:
                heapq.heappush(heap, (rank_load[r], r, version[r]))
    return rank_experts
