"""Expert placement of one MoE layer in one expert-parallel group: a table from global slots to experts.

The group has `ep` ranks with `slots_per_rank` slots each; global slot `s` lives on rank `s // slots_per_rank`.
`slot_expert[s]` is the logical expert held in slot `s`, or -1 for an empty slot. An expert may hold several
slots (replicas), at most one per rank; tokens routed to it are split among its replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from triton_ops.checks import require

EMPTY = -1


@dataclass(frozen=True)
class Placement:
    """`slot_expert`: length ep * slots_per_rank, entries in [-1, num_experts); every expert holds >= 1 slot."""

    num_experts: int
    ep: int
    slot_expert: tuple[int, ...]

    def __post_init__(self) -> None:
        table = tuple(int(x) for x in self.slot_expert)
        object.__setattr__(self, "slot_expert", table)
        E, ep = self.num_experts, self.ep
        if not (isinstance(E, int) and E >= 1 and isinstance(ep, int) and ep >= 1):
            raise ValueError(f"placement: num_experts={E!r} and ep={ep!r} must be integers >= 1")
        if not table or len(table) % ep:
            raise ValueError(f"placement: slot table has {len(table)} slots; need a positive multiple of ep={ep}")
        spr = len(table) // ep
        replicas: list[list[int]] = [[] for _ in range(E)]
        for slot, e in enumerate(table):
            if e == EMPTY:
                continue
            if not 0 <= e < E:
                raise ValueError(f"placement: slot entries must be -1 (empty) or an expert in [0, {E}); got {e}")
            if replicas[e] and replicas[e][-1] // spr == slot // spr:
                raise ValueError(
                    f"placement: expert {e} is held twice on rank {slot // spr}; replicas need distinct ranks"
                )
            replicas[e].append(slot)
        missing = [e for e in range(E) if not replicas[e]]
        if missing:
            raise ValueError(f"placement: experts {missing} have no slot; every expert needs at least one replica")
        object.__setattr__(self, "_replicas", tuple(tuple(r) for r in replicas))

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Cached per device: replicas per expert [E]; each expert's slots, ascending, -1 padded [E, max r];
        per slot, its expert (empty -> 0) [S] and the share of that expert's load it carries (empty -> 0) [S]."""
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            width = max(len(r) for r in self._replicas)
            cache[device] = (
                torch.tensor([len(r) for r in self._replicas], device=device),
                torch.tensor([r + (EMPTY,) * (width - len(r)) for r in self._replicas], device=device),
                torch.tensor([max(e, 0) for e in self.slot_expert], device=device),
                torch.tensor(
                    [1.0 / len(self._replicas[e]) if e >= 0 else 0.0 for e in self.slot_expert],
                    dtype=torch.float64,
                    device=device,
                ),
            )
        return cache[device]

    @classmethod
    def contiguous(cls, num_experts: int, ep: int, extra_slots: int = 0) -> Placement:
        """Static layout: expert e in slot e % (E/ep) of rank e // (E/ep); the `extra_slots` per rank stay empty."""
        if ep < 1 or num_experts % ep or extra_slots < 0:
            raise ValueError(
                f"placement: ep={ep} must divide num_experts={num_experts} and extra_slots={extra_slots} be >= 0"
            )
        local = num_experts // ep
        rows = [list(range(r * local, (r + 1) * local)) + [EMPTY] * extra_slots for r in range(ep)]
        return cls(num_experts, ep, tuple(e for row in rows for e in row))

    @classmethod
    def from_rank_experts(
        cls, rank_experts: Sequence[Sequence[int]], num_experts: int, slots_per_rank: int, keep: Placement | None = None
    ) -> Placement:
        """Lay out the experts each rank should hold (`rank_experts[r]`) into slots. An expert that `keep` already
        holds on the same rank keeps its slot (no copy needed); the others fill the remaining slots in order."""
        table: list[int] = []
        for rank, experts in enumerate(rank_experts):
            if len(experts) > slots_per_rank:
                raise ValueError(f"placement: rank {rank} is given {len(experts)} experts for {slots_per_rank} slots")
            row = [EMPTY] * slots_per_rank
            old = keep.slot_expert[rank * slots_per_rank : (rank + 1) * slots_per_rank] if keep is not None else ()
            placed = set()
            for e in experts:
                if e in old and row[old.index(e)] == EMPTY:
                    row[old.index(e)] = e
                    placed.add(e)
            free = iter(i for i in range(slots_per_rank) if row[i] == EMPTY)
            for e in experts:
                if e not in placed:
                    row[next(free)] = e
            table.extend(row)
        return cls(num_experts, len(rank_experts), tuple(table))

    @property
    def slots_per_rank(self) -> int:
        return len(self.slot_expert) // self.ep

    @property
    def slot_table(self) -> torch.Tensor:
        """LongTensor [ep * slots_per_rank]: expert per global slot, -1 = empty."""
        return torch.tensor(self.slot_expert, dtype=torch.long)

    @property
    def num_replicas(self) -> torch.Tensor:
        """LongTensor [E]: replicas per expert."""
        return torch.tensor([len(r) for r in self._replicas])

    @cached_property
    def rank_experts(self) -> tuple[tuple[int, ...], ...]:
        """Experts held by each rank, in slot order (empty slots left out)."""
        spr = self.slots_per_rank
        return tuple(tuple(e for e in self.slot_expert[r * spr : (r + 1) * spr] if e != EMPTY) for r in range(self.ep))

    def replicas_of(self, expert: int) -> tuple[int, ...]:
        """Global slots holding `expert`, ascending (so also by rank)."""
        return self._replicas[expert]

    def ranks_of(self, expert: int) -> tuple[int, ...]:
        """Ranks holding `expert`, ascending."""
        return tuple(s // self.slots_per_rank for s in self.replicas_of(expert))

    def route(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Map routed experts to global slots. expert_ids: LongTensor [T, k] (any shape), -1 = dropped -> slot ids of
        the same shape, -1 kept. The i-th of the n assignments to an expert with r replicas (in flattened order) goes
        to its replica floor(i * r / n): contiguous chunks of floor(n/r) or ceil(n/r) assignments. Vectorised, with
        no host sync (the range check is asynchronous on accelerators)."""
        flat = expert_ids.reshape(-1)
        if flat.numel() == 0:
            return expert_ids.clone()
        lo, hi = torch.aminmax(flat)
        require((lo >= EMPTY) & (hi < self.num_experts), f"route: expert id out of range [0, {self.num_experts})")
        num_replicas, replica_slots, _, _ = self._tables(flat.device)
        if replica_slots.shape[1] == 1:  # no replicas: a lookup
            return torch.where(flat >= 0, replica_slots[flat.clamp(min=0), 0], EMPTY).view_as(expert_ids)
        ids = torch.where(flat >= 0, flat, self.num_experts)  # dropped: a spare expert E with no slot
        num_replicas = torch.cat([num_replicas, num_replicas.new_ones(1)])
        replica_slots = torch.cat([replica_slots, replica_slots.new_full((1, replica_slots.shape[1]), EMPTY)])
        order = torch.sort(ids, stable=True).indices
        counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, ids, torch.ones_like(ids))
        starts = torch.cumsum(counts, 0) - counts
        occurrence = torch.empty_like(ids)  # i: how many earlier assignments went to the same expert
        occurrence[order] = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]
        return replica_slots[ids, occurrence * num_replicas[ids] // counts[ids]].view_as(expert_ids)

    def rank_load(self, expert_load: torch.Tensor) -> torch.Tensor:
        """Expert load [..., E] -> rank load [..., ep] (float64, on the load's device); each replica carries
        load / replicas."""
        expert_load = torch.as_tensor(expert_load, dtype=torch.float64)
        _, _, experts, weights = self._tables(expert_load.device)
        slot_load = expert_load[..., experts] * weights
        return slot_load.unflatten(-1, (self.ep, self.slots_per_rank)).sum(-1)

    def rank_imbalance(self, expert_load: torch.Tensor) -> float:
        """The busiest rank's load over the mean rank's, for expert load [E]."""
        ranks = self.rank_load(expert_load)
        return float(ranks.max() / ranks.mean().clamp(min=1e-12))


@dataclass(frozen=True)
class Move:
    """One expert copy a placement switch needs: parameters and optimizer state of `expert` go from global slot
    `src` (on `src_rank`, read before the switch) to slot `dst` (on `dst_rank`). `local`: same rank, no network."""

    expert: int
    src: int
    dst: int
    src_rank: int
    dst_rank: int

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank


def moves(old: Placement, new: Placement) -> tuple[Move, ...]:
    """Copies that switching `old` -> `new` needs, one per slot whose content changes to an expert (slots that become
    empty need none). If `old` holds the new expert on the destination rank the copy is local; otherwise it is sent
    from one of the expert's old replicas, taken round-robin over that expert's remote copies. Sources are read from
    the old placement, so swaps are fine if all sends are posted before any slot is overwritten."""
    if (old.num_experts, old.ep, old.slots_per_rank) != (new.num_experts, new.ep, new.slots_per_rank):
        raise ValueError(
            "moves: placements differ in shape: "
            f"(E, ep, slots) {(old.num_experts, old.ep, old.slots_per_rank)} vs "
            f"{(new.num_experts, new.ep, new.slots_per_rank)}"
        )
    spr = old.slots_per_rank
    sent: dict[int, int] = {}
    result = []
    for dst, (was, e) in enumerate(zip(old.slot_expert, new.slot_expert)):
        if e == was or e == EMPTY:
            continue
        sources = old.replicas_of(e)
        local = [s for s in sources if s // spr == dst // spr]
        if local:
            src = local[0]
        else:
            src = sources[sent.get(e, 0) % len(sources)]
            sent[e] = sent.get(e, 0) + 1
        result.append(Move(e, src, dst, src // spr, dst // spr))
    return tuple(result)
