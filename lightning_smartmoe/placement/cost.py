"""Placement cost model: predicted per-step time of one MoE layer's placement, and the price of switching.

Per step and layer (seconds), for expert load L [E] in tokens:
  compute  = token_time * max_rank_load(L)      token_time = 6 * P / flops_per_s (forward + backward of the FFN)
  sync     = max over ranks of the gradient traffic of the replicated experts the rank holds: the r > 1
             replicas of an expert sum their gradients by a reduce-scatter and an all-gather (as
             placement/replica_sync.py does), so each of the r ranks sends and receives
             2 (r - 1) / r * P * grad_bytes_per_param bytes; ranks' links run concurrently, one rank's transfers
             back to back. Half the traffic is in each of the two phases.
  exposed  = the part of sync that backward does not hide. OverlappedReplicaSync starts a layer's
             reduce-scatter when its expert gradients are ready and its all-gather when the next MoE layer's
             (in backward order) are; so with `hiding_layers` = 1 the reduce-scatter runs under the backward of
             one more MoE layer, with 2 the all-gather too. Each phase is hidden up to that layer's backward
             time, taken as this layer's (2/3 of compute); the rest, and every phase without a layer to hide
             under, is exposed. hiding_layers = 0 (the default): nothing hidden.
  step     = compute + exposed
A switch costs migration_time = remote copies * P * state_bytes_per_param / bandwidth once (copies counted serially).

Defaults: an expert FFN of d_model 1024, hidden 4096 with biases (P = 2*1024*4096 + 4096 + 1024 = 8,393,728),
on H100-class ranks: 4e14 FLOP/s sustained (about 40% of the 989 TFLOP/s dense bf16 peak), 1e11 bytes/s for
all-reduce and point-to-point (below NVLink, above one 400 Gb/s NIC), fp32 gradients (Lightning bf16-mixed keeps
fp32 weights), and 12 bytes moved per parameter (fp32 weight + Adam exp_avg + exp_avg_sq).
Since compute and traffic both scale with P, the balance between them depends only on flops_per_s,
bandwidth and the byte sizes: sending one expert's gradient once costs as much as computing
grad_bytes_per_param * flops_per_s / (6 * bandwidth) tokens (about 2,700 with the defaults).
grad_bytes_per_param = 0 models a replica gradient exchange that costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_smartmoe.placement.map import Placement, moves


@dataclass(frozen=True)
class CostModel:
    expert_params: int = 8_393_728  # P, parameters of one expert
    flops_per_s: float = 4e14  # sustained expert FFN throughput of one rank
    bandwidth: float = 1e11  # bytes/s of one rank's link, for replica gradients and migration
    grad_bytes_per_param: float = 4  # bytes per gradient element exchanged among replicas (0: hidden)
    state_bytes_per_param: float = 12  # bytes moved per parameter when an expert migrates
    hiding_layers: int = 0  # MoE layers whose backward can hide this layer's replica exchange (see above)

    def __post_init__(self) -> None:
        for key in ("expert_params", "flops_per_s", "bandwidth", "grad_bytes_per_param", "state_bytes_per_param"):
            value = getattr(self, key)
            zero_ok = key == "grad_bytes_per_param"
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"cost.{key}={value!r} must be a number {'>= 0' if zero_ok else '> 0'}")
        if isinstance(self.hiding_layers, bool) or not isinstance(self.hiding_layers, int) or self.hiding_layers < 0:
            raise ValueError(f"cost.hiding_layers={self.hiding_layers!r} must be an integer >= 0")

    @property
    def token_time(self) -> float:
        """Seconds of expert forward + backward per routed token."""
        return 6.0 * self.expert_params / self.flops_per_s

    def layout_time(self, rank_experts: Sequence[Sequence[int]], load: Sequence[float]) -> float:
        """Predicted seconds per step when rank r holds replicas of the experts rank_experts[r] (distinct per rank)
        and expert e receives load[e] tokens, split evenly over its replicas."""
        replicas = [0] * len(load)
        for experts in rank_experts:
            for e in experts:
                replicas[e] += 1
        busiest = max(sum(load[e] / replicas[e] for e in experts) for experts in rank_experts)
        sync = max(sum(2 * (replicas[e] - 1) / replicas[e] for e in experts) for experts in rank_experts)
        return self._step(busiest, sync)

    def time_bound(self, replicas: Sequence[int], load: Sequence[float], ep: int) -> float:
        """A lower bound of layout_time over all layouts on `ep` ranks with replicas[e] replicas of expert e: the
        busiest rank carries at least the mean and the largest replica, and the busiest link at least the mean."""
        busiest = max(sum(load) / ep, max(x / r for x, r in zip(load, replicas)))
        sync = sum(2 * (r - 1) for r in replicas) / ep
        return self._step(busiest, sync)

    def _step(self, busiest: float, sync: float) -> float:
        """compute + exposed (see the module docstring) for the busiest rank's tokens and the busiest link's
        gradient copies; non-decreasing in both, so bounds on them bound the step."""
        compute = self.token_time * busiest
        phase = sync / 2 * self.expert_params * self.grad_bytes_per_param / self.bandwidth
        hide = 2 / 3 * compute
        hidden_phases = min(self.hiding_layers, 2)
        return compute + sum(max(0.0, phase - hide) if i < hidden_phases else phase for i in range(2))

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert migration sends (parameters and optimizer state)."""
        return round(self.expert_params * self.state_bytes_per_param)

    def step_time(self, placement: Placement, load: torch.Tensor) -> float:
        """Predicted seconds per step for expert load [E] under `placement`."""
        return self.layout_time(placement.rank_experts, torch.as_tensor(load, dtype=torch.float64).tolist())

    def migration_time(self, old: Placement, new: Placement) -> float:
        """Seconds to copy the experts that switching old -> new sends over the network (local copies are free)."""
        return sum(not m.local for m in moves(old, new)) * self.expert_bytes / self.bandwidth

    def switch_gain(self, old: Placement, new: Placement, load: torch.Tensor, steps: int) -> float:
        """Seconds saved by running `new` instead of `old` for `steps` steps at load [E], minus migration."""
        return (self.step_time(old, load) - self.step_time(new, load)) * steps - self.migration_time(old, new)


def should_switch(
    cost: CostModel, old: Placement, new: Placement, load: torch.Tensor, steps: int, min_gain: float
) -> bool:
    """The min_gain rule: switch iff the placement changes and switch_gain(...) > min_gain (seconds)."""
    return new != old and cost.switch_gain(old, new, load, steps) > min_gain
