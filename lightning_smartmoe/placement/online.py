"""SmartMoE's online stage, migration-aware: when a planner's placement is worth switching to.

A switch is paid once (moving the experts that change rank, planner.cost.ExpertLayerCost.migration_time) and
earns its per-step saving for as long as the new placement stays better than the current one. That is not one
decision interval: a load that barely drifts keeps a good placement good for hundreds of steps, a jumpy one for
a few. `SwitchRule` estimates the lifetime from the layer's own recent loads: a proposal that would have beaten
the current placement on each of the last k observed loads is expected to keep beating it for about as long
again (k samples), and at least for the next interval; the saving is the proposal's mean advantage over those k
loads. The loads the proposal was planned from are no evidence (it fits their noise by construction), so the k
loads are the ones before them. It switches iff saving x lifetime - migration > min_gain. Every rank holds the
same loads (all-reduced) and makes the same decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lightning_smartmoe.placement.map import Placement, moves

if TYPE_CHECKING:  # placement/ takes the planner's cost model as an argument; it imports nothing of planner/
    from lightning_smartmoe.planner.cost import ExpertLayerCost

MEMORY = 32  # observed loads a rule keeps per layer


def placement_time(cost: ExpertLayerCost, placement: Placement, load: torch.Tensor | Sequence[float]) -> float:
    """Predicted seconds per step of `placement` at expert load [E] (rows per step)."""
    return cost.layout_time(placement.rank_experts, torch.as_tensor(load, dtype=torch.float64).tolist())


def migration_time(cost: ExpertLayerCost, old: Placement, new: Placement) -> float:
    """Seconds to move from `old` to `new` (only copies between ranks cost; local ones are free)."""
    return cost.migration_time([(m.src_rank, m.dst_rank) for m in moves(old, new) if not m.local])


@dataclass
class SwitchRule:
    """The switch decision of one MoE layer (see the module docstring). `observe` each step's (or trace
    sample's) load, then ask `should_switch`."""

    min_gain: float = 0.0
    loads: list[torch.Tensor] = field(default_factory=list)  # oldest first, at most MEMORY

    def observe(self, load: torch.Tensor | Sequence[float]) -> None:
        self.loads = (self.loads + [torch.as_tensor(load, dtype=torch.float64).cpu()])[-MEMORY:]

    def lifetime(self, cost: ExpertLayerCost, current: Placement, proposal: Placement, planned_from: int) -> tuple[int, float]:
        """(k, mean advantage in seconds per step): the most recent observed loads before the newest
        `planned_from` ones, k of them in a row, on which `proposal` beats `current`, and its mean advantage over
        those."""
        advantages = []
        for load in reversed(self.loads[: max(0, len(self.loads) - planned_from)]):
            gain = placement_time(cost, current, load) - placement_time(cost, proposal, load)
            if gain <= 0:
                break
            advantages.append(gain)
        return len(advantages), (sum(advantages) / len(advantages) if advantages else 0.0)

    def expected_gain(self, cost: ExpertLayerCost, current: Placement, proposal: Placement, planned_from: int,
                      steps_per_load: float, min_steps: float) -> float:
        """Seconds a switch saves over the proposal's expected lifetime (at least `min_steps` steps), minus the
        migration; the proposal was planned from the newest `planned_from` loads, each standing for
        `steps_per_load` steps."""
        if proposal == current:
            return 0.0
        k, advantage = self.lifetime(cost, current, proposal, planned_from)
        horizon = max(min_steps, k * steps_per_load)
        return advantage * horizon - migration_time(cost, current, proposal)

    def should_switch(self, cost: ExpertLayerCost, current: Placement, proposal: Placement, planned_from: int,
                      steps_per_load: float, min_steps: float) -> bool:
        gain = self.expected_gain(cost, current, proposal, planned_from, steps_per_load, min_steps)
        return proposal != current and gain > self.min_gain
