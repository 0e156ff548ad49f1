"""Packing one MoE layer's experts onto the ranks of its expert-parallel group, for the planners: expert load [E]
and the current placement -> the experts each rank holds (a list [ep] of expert lists).

- lpt: longest processing time first, one replica per expert (SmartMoE's rule);
- by_node: experts to nodes, then `fill` inside each node: each expert on as few ranks as let its share fit under
  a target rank load, so that replica counts follow the room a node has left;
- refine: single-replica moves and swaps inside a node that lower the busiest rank;
- align: relabels nodes and the ranks inside each node, which changes no cost but migration, so that as many
  experts as possible stay where they are.
Deterministic: float64 in a fixed order, ties broken by index.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning_smartmoe.placement.map import Placement

REFINE_STEPS = 64  # refine: changes at most
Item = tuple[float, int, int]  # fill: (load, expert, replicas; 0 = as few as fit)


@dataclass
class Layer:
    """What every packing of one decision shares: load [E], the current placement, `per_node` consecutive ranks
    per node."""

    load: list[float]
    current: Placement
    per_node: int
    home: list[list[int]] = field(init=False)  # ranks holding each expert now [E][...]
    at_home: list[list[int]] = field(init=False)  # replicas of each expert on each node now [E][nodes]
    groups: list[range] = field(init=False)  # the ranks of each node
    home_nodes: list[list[int]] = field(init=False)  # the nodes holding each expert now, most replicas first
    order: list[int] = field(init=False)  # experts by load descending, ties: lower index

    def __post_init__(self) -> None:
        self.groups = nodes(self.current.ep, self.per_node)
        self.home = [[] for _ in self.load]
        self.at_home = [[0] * len(self.groups) for _ in self.load]
        for rank, experts in enumerate(self.current.rank_experts):
            for e in experts:
                self.home[e].append(rank)
                self.at_home[e][rank // self.per_node] += 1
        self.order = sorted(range(len(self.load)), key=lambda e: (-self.load[e], e))
        self.home_nodes = [sorted((n for n, c in enumerate(counts) if c), key=lambda n: (-counts[n], n))
                           for counts in self.at_home]


def nodes(ep: int, per_node: int) -> list[range]:
    """The group's ranks by node: `per_node` consecutive ranks each (the last node may have fewer)."""
    return [range(first, min(ep, first + per_node)) for first in range(0, ep, per_node)]


def kept_floor(layer: Layer) -> float:
    """The least rows the busiest rank computes when every expert stays on the nodes that hold it now: the mean,
    or the load of the experts held by one node only over that node's ranks if higher."""
    node_load = [0.0] * len(layer.groups)
    for e, where in enumerate(layer.home_nodes):
        if len(where) == 1:
            node_load[where[0]] += layer.load[e]
    return max(sum(layer.load) / layer.current.ep, *(x / len(ranks) for x, ranks in zip(node_load, layer.groups)))


def lpt(layer: Layer, capacity: int) -> list[list[int]]:
    """Experts by load descending (ties: lower index), each to the least-loaded rank with fewer than `capacity`
    experts (ties: a rank that holds it now, then the lower rank)."""
    ep, load = layer.current.ep, layer.load
    out: list[list[int]] = [[] for _ in range(ep)]
    rank_load = [0.0] * ep
    version = [0] * ep  # a heap entry (load, rank, version) is stale once its rank's version moved on
    heap = [(0.0, r, 0) for r in range(ep)]
    for e in layer.order:
        while True:
            edge, r, v = heapq.heappop(heap)
            if v == version[r]:
                break
        tied = [h for h in layer.home[e] if h != r and rank_load[h] == edge and len(out[h]) < capacity]
        if tied and r not in layer.home[e]:  # a home rank as loaded as the least-loaded one wins the tie
            heapq.heappush(heap, (edge, r, version[r]))
            r = tied[0]
        rank_load[r] += load[e]
        out[r].append(e)
        version[r] += 1
        if len(out[r]) < capacity:
            heapq.heappush(heap, (rank_load[r], r, version[r]))
    return out


def fill(items: Sequence[Item], ranks: range, capacity: int, target: float, out: list[list[int]],
         rank_load: list[float], home: Sequence[Sequence[int]]) -> None:
    """Each item (distinct experts) in order onto distinct ranks of `ranks` with fewer than `capacity` experts, its
    load split evenly (`out`, `rank_load` [ep] updated in place). replicas 0: the fewest r whose share load / r
    fits under `target` on r ranks, taking the ranks that hold the expert now first, then the least loaded; if no
    r fits, the r whose busiest rank ends lowest on the least-loaded ranks. replicas > 0: that many least-loaded
    ranks. An item never takes the slots the later items need, one each."""
    left = {r: capacity - len(out[r]) for r in ranks}  # free slots per rank
    free = sum(left.values())
    for i, (x, e, fixed) in enumerate(items):
        least, lightest = -1, math.inf
        for r, n in left.items():
            if n and rank_load[r] < lightest:
                least, lightest = r, rank_load[r]
        if not fixed and lightest + x <= target:  # one replica fits: the common case, without sorting
            chosen, lightest = [least], math.inf
            for h in home[e]:
                if left.get(h) and rank_load[h] + x <= target and rank_load[h] < lightest:
                    chosen, lightest = [h], rank_load[h]
        else:
            room = sorted((rank_load[r], r) for r, n in left.items() if n)  # least loaded first
            limit = min(len(room), free - (len(items) - i - 1))
            r = min(fixed, limit)
            if not fixed:
                for k in range(2, limit + 1):
                    if room[k - 1][0] + x / k <= target:
                        r = k
                        break
            if fixed or not r:
                r = r or min(range(1, limit + 1), key=lambda r: (room[r - 1][0] + x / r, r))
                chosen = [q for _, q in room[:r]]
            else:
                fits = [q for load, q in room if load + x / r <= target]
                chosen = ([q for q in fits if q in home[e]] + [q for q in fits if q not in home[e]])[:r]
        for q in chosen:
            out[q].append(e)
            rank_load[q] += x / len(chosen)
            left[q] -= 1
        free -= len(chosen)


def by_node(layer: Layer, capacity: int, slack: float, keep: bool) -> list[list[int]]:
    """Experts to nodes, then `fill` inside each node toward the rank target T = (1 + slack) x the mean rank load
    (the node's own mean x (1 + slack) where that is higher).

    An expert heavier than T x per_node spans ceil(load / (T x per_node)) nodes with the same number of replicas on
    each (the fewest that bring its share under T, at most per_node), while slots beyond one per expert last;
    every other expert lives on one node. Experts by load descending go to distinct nodes with fewer experts than
    slots:
    - keep: the nodes that hold the expert now, the one with most of its replicas first (no more nodes than
      those), so that nothing crosses nodes;
    - else: the node with most of its replicas now if that node stays within T x its ranks and has unclaimed the
      slots the expert is expected to need (ceil(load / T), at most per_node); otherwise the node with the lowest
      load per rank among those with the slots (ties: the lower node), or the one with the most unclaimed slots."""
    load, groups, per_node = layer.load, layer.groups, layer.per_node
    target = (1 + slack) * sum(load) / layer.current.ep
    slots = [len(ranks) * capacity for ranks in groups]
    budget = [n - len(ranks) + 1 for n, ranks in zip(slots, groups)]  # less a split replica per rank boundary
    claimed = [0] * len(groups)  # slots the experts on each node are expected to need
    held = [0] * len(groups)  # experts on each node: at most its slots
    node_load = [0.0] * len(groups)
    items: list[list[Item]] = [[] for _ in groups]
    spare = sum(slots) - len(load)  # slots beyond one per expert, for the pieces of spanning experts
    for e in layer.order:
        x = load[e]
        span, fixed, need = 1, 0, 1
        if x > target:
            span = max(1, min(len(groups), -int(-x // (target * per_node))))
            if keep:
                span = min(span, len(layer.home_nodes[e]))
            span = span if spare >= span - 1 else 1
            fixed = min(per_node, -int(-x // (span * target))) if span > 1 else 0
            need = fixed or min(per_node, -int(-x // target))
        chosen: list[int] = []
        for _ in range(span):
            if keep:
                n = next((n for n in layer.home_nodes[e] if n not in chosen and held[n] < slots[n]), -1)
            else:
                n = _node_for(x / span, need, e, chosen, layer, target, node_load, claimed, budget, held, slots)
            if n < 0:
                break
            chosen.append(n)
            claimed[n] += need
            held[n] += 1
            node_load[n] += x / span
        spare -= len(chosen) - 1
        for n in chosen:
            items[n].append((x / len(chosen), e, fixed))
    out: list[list[int]] = [[] for _ in range(layer.current.ep)]
    rank_load = [0.0] * layer.current.ep
    for n, ranks in enumerate(groups):
        node_target = max(target, (1 + slack) * node_load[n] / len(ranks))
        fill(sorted(items[n], key=lambda i: (not i[2], -i[0], i[1])), ranks, capacity, node_target, out, rank_load,
             layer.home)
    return out


def _node_for(piece: float, need: int, e: int, chosen: list[int], layer: Layer, target: float,
              node_load: list[float], claimed: list[int], budget: list[int], held: list[int], slots: list[int]) -> int:
    """by_node's choice of a node for a piece of expert e (not `keep`), -1 if every node is full."""
    groups = layer.groups
    for n in layer.home_nodes[e]:  # most replicas first, then the lower node
        if (n not in chosen and held[n] < slots[n] and claimed[n] + need <= budget[n]
                and node_load[n] + piece <= target * len(groups[n])):
            return n
    best, lightest = -1, math.inf
    for n in range(len(groups)):
        if n not in chosen and held[n] < slots[n] and claimed[n] + need <= budget[n]:
            per_rank = node_load[n] / len(groups[n])
            if per_rank < lightest:
                best, lightest = n, per_rank
    if best < 0:
        open_nodes = [n for n in range(len(groups)) if n not in chosen and held[n] < slots[n]]
        best = max(open_nodes, key=lambda n: (budget[n] - claimed[n], -n), default=-1)
    return best


def refine(out: list[list[int]], load: Sequence[float], capacity: int, groups: Sequence[range]) -> list[list[int]]:
    """Repeatedly make the move of one replica off the busiest rank (to a rank of its node with a free slot), or
    its swap with a lighter replica of such a rank, that lowers the larger of the two ranks' loads the most, while
    that ends below the busiest rank's load (at most REFINE_STEPS changes; `groups`: the ranks of each node).
    Replica counts stay; an expert stays on distinct ranks. Returns a new list."""
    out = [list(experts) for experts in out]
    counts = [0] * len(load)
    for experts in out:
        for e in experts:
            counts[e] += 1
    share = [x / c if c else 0.0 for x, c in zip(load, counts)]
    rank_load = [sum(share[e] for e in experts) for experts in out]
    for _ in range(REFINE_STEPS):
        a = max(range(len(out)), key=rank_load.__getitem__)  # the first of the busiest
        top = rank_load[a]
        best, change = top * (1 - 1e-12), None
        for e in out[a]:
            w = share[e]
            for b in groups[a // len(groups[0])]:
                if b == a or e in out[b]:
                    continue
                lb = rank_load[b]
                if lb + w < best and len(out[b]) < capacity:  # a move: rank a ends at top - w < top
                    best, change = max(top - w, lb + w), (e, b, -1)
                for f in out[b]:
                    u = share[f]
                    if u < w and max(top - w + u, lb - u + w) < best and f not in out[a]:
                        best, change = max(top - w + u, lb - u + w), (e, b, f)
        if change is None:
            break
        e, b, f = change
        out[a].remove(e)
        out[b].append(e)
        rank_load[a] -= share[e]
        rank_load[b] += share[e]
        if f >= 0:
            out[b].remove(f)
            out[a].append(f)
            rank_load[b] -= share[f]
            rank_load[a] += share[f]
    return out


def align(out: Sequence[Sequence[int]], layer: Layer) -> list[list[int]]:
    """`out` relabelled: nodes of equal size matched to the nodes of the current placement sharing most replicas
    with them, then inside each node ranks to the ranks sharing most experts (greedy matching, ties by index)."""
    groups, per_node = layer.groups, layer.per_node
    placed: dict[tuple[int, int], int] = {}  # (expert, new node) -> its replicas there
    for r, experts in enumerate(out):
        for e in experts:
            placed[e, r // per_node] = placed.get((e, r // per_node), 0) + 1
    weight: dict[tuple[int, int], int] = {}  # (new node, old node) -> replicas they share
    for (e, n), c in placed.items():
        for m in layer.home_nodes[e]:
            weight[n, m] = weight.get((n, m), 0) + min(c, layer.at_home[e][m])
    result: list[list[int]] = [[] for _ in out]
    sizes = [len(ranks) for ranks in groups]
    for n, m in _match(weight, len(groups), lambda a, b: sizes[a] == sizes[b]).items():
        ranks, target = groups[n], groups[m]
        shared: dict[tuple[int, int], int] = {}
        for i, r in enumerate(ranks):
            for e in out[r]:
                for q in layer.home[e]:
                    if q in target:
                        shared[i, q - target.start] = shared.get((i, q - target.start), 0) + 1
        for i, j in _match(shared, len(ranks), lambda a, b: True).items():
            result[target[j]] = list(out[ranks[i]])
    return result


def _match(weight: dict[tuple[int, int], int], size: int, allowed: Callable[[int, int], bool]) -> dict[int, int]:
    """Greedy matching of a to b in range(size): pairs by weight descending (ties: lower a, then lower b), then
    the pairs of weight 0 in the same order, among the `allowed(a, b)` ones -> {a: b}."""
    taken_a: dict[int, int] = {}
    taken_b: set[int] = set()
    pairs = sorted(((-w, a, b) for (a, b), w in weight.items() if w > 0))
    pairs += [(0, a, b) for a in range(size) for b in range(size)]
    for _, a, b in pairs:
        if a not in taken_a and b not in taken_b and allowed(a, b):
            taken_a[a] = b
            taken_b.add(b)
            if len(taken_a) == size:
                break
    return taken_a
