"""The MoE FFN layer: router -> placement -> dispatcher -> experts -> dispatcher, plus optional shared experts."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe.mlp import mlp
from lightning_smartmoe import init
from lightning_smartmoe.moe.config import MoEConfig
from lightning_smartmoe.moe.dispatcher import TokenDispatcher
from lightning_smartmoe.moe.experts import GroupedExperts
from lightning_smartmoe.moe.losses import load_balancing_loss, router_z_loss
from lightning_smartmoe.moe.router import Router
from lightning_smartmoe.recompute import is_recomputing
from lightning_smartmoe.tensor_parallel import (
    all_gather_sequence,
    copy_to_tp,
    gather_from_sequence,
    reduce_from_tp,
    reduce_scatter_sequence,
    scatter_to_sequence,
)
from triton_ops import expert_histogram


@dataclass
class MoEStats:
    """Detached figures of the last forward on this rank (of the last `forwards` forwards, summed, when the
    layer's `sum_stats` is set, as for the micro-batches of a pipeline step)."""

    expert_load: Tensor  # [E] int64 assignments computed per logical expert (after drops)
    dropped: Tensor  # [] int64 assignments dropped for capacity
    assignments: int  # T * k
    aux_loss: Tensor  # [] load-balancing loss of this rank's tokens (unscaled; from this rank's counts alone
    # when its coefficient is 0)
    z_loss: Tensor  # [] router z-loss of this rank's tokens (unscaled)
    forwards: int = 1

    def nothing(self) -> "MoEStats":
        """Zero figures of the same shapes (a rank whose tokens another rank already counts)."""
        zero = self.dropped.new_zeros(())
        return MoEStats(torch.zeros_like(self.expert_load), zero, 0, zero.double(), zero.double(), 0)

    def __add__(self, other: "MoEStats") -> "MoEStats":
        return MoEStats(
            self.expert_load + other.expert_load, self.dropped + other.dropped, self.assignments + other.assignments,
            self.aux_loss + other.aux_loss, self.z_loss + other.z_loss, self.forwards + other.forwards,
        )


class MoELayer(nn.Module):
    """Mixture-of-experts FFN. forward(x [B, S, d]) -> (y [B, S, d], scaled aux loss []).

    With `shared_experts`, every token also goes through `shared` (one dense FFN holding the shared experts'
    hidden units together), optionally scaled by sigmoid(`shared_gate`(x)); its output is added to the routed
    experts'. Under tensor parallelism it is sharded as a dense FFN (column- then row-parallel).

    Built with all experts; `distribute` keeps this rank's share and wires the dispatcher to an
    expert-parallel group. The returned aux loss (aux_loss_coeff * balance + z_loss_coeff * z) must be
    added to the training loss. `placement` (handed in by `distribute` or `relabel`: a
    lightning_smartmoe.placement.Placement, or anything with its slot_expert, slots_per_rank, num_replicas
    and route) says which global slot holds which logical expert; tokens of a replicated expert are split
    among its replicas. Without one, slot e holds expert e.

    Under tensor parallelism the ranks of the TP group hold the same tokens; each routes and dispatches
    its own contiguous slice of every sequence, so no token is computed twice, and the outputs are
    gathered back (with sequence parallelism the input and output stay sliced). With `expert_tp` instead,
    every TP rank routes all the tokens and computes its slice of each expert's hidden units, and the
    partial outputs are summed over the group. Either way each rank's aux loss is a 1 / tp share, so the
    TP ranks' losses add up to the whole batch's; with `expert_tp` only TP rank 0 reports `stats`.
    """

    def __init__(self, d_model: int, ffn_hidden: int, cfg: MoEConfig, out_std: float = 0.02) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        hidden = cfg.expert_hidden or ffn_hidden
        self.experts = GroupedExperts(cfg.num_experts, d_model, hidden, out_std, cfg.activation)
        self.shared = mlp(cfg.activation, d_model, cfg.shared_hidden(hidden), out_std) if cfg.shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        if self.shared_gate is not None:
            init.normal_(self.shared_gate.weight, std=0.02)
        self.placement = None
        self.dispatcher = TokenDispatcher(cfg.num_experts)
        self.ep_group: dist.ProcessGroup | None = None
        self.ep_rank = 0
        self.token_group: dist.ProcessGroup | None = None
        self.tp_group: dist.ProcessGroup | None = None
        self.sequence_parallel = False
        self.expert_tp = False
        self.index: int | None = None  # position among the whole model's MoE layers (set by the strategy)
        self.stats: MoEStats | None = None
        self.sum_stats = False
        self.bias_load: Tensor | None = None  # [E] assignments routed since the last expert-bias update

    def distribute(
        self,
        ep_group: dist.ProcessGroup,
        token_group: dist.ProcessGroup,
        placement,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        expert_tp: bool = False,
    ) -> None:
        """Keep this rank's experts under `placement` (over `ep_group`'s ranks) and dispatch over `ep_group`.

        Args:
            ep_group: ranks that hold different experts.
            token_group: ranks whose tokens together form the global batch (for the aux-loss statistics).
            placement: the initial slot table (its ep is ep_group's size; spare slots per rank hold replicas).
            tp_group: tensor-parallel ranks, which hold the same tokens (None or a group of one: none).
            sequence_parallel: the input and output are already this rank's slice of every sequence.
            expert_tp: shard each expert's hidden units over `tp_group` instead of slicing the tokens.
        Calling it again with the same group (a second fit, validate after fit) keeps the current shard.
        """
        if self.ep_group is ep_group:
            return
        if self.ep_group is not None:
            raise RuntimeError("this MoELayer is already sharded over another expert-parallel group")
        self.ep_group, self.ep_rank = ep_group, dist.get_rank(ep_group)
        self.placement = placement
        self.experts.select(self.local_experts(self.placement))
        # a group of one rank dispatches locally: no all-to-all of counts and rows with itself
        exchange = ep_group if dist.get_world_size(ep_group) > 1 else None
        self.dispatcher = TokenDispatcher(self.placement.slots_per_rank, exchange)
        self.token_group = token_group
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            self.shard_tensor_parallel(tp_group, sequence_parallel, expert_tp)

    def shard_tensor_parallel(self, tp_group: dist.ProcessGroup, sequence_parallel: bool, expert_tp: bool) -> None:
        """Keep this rank's tensor-parallel part: with `expert_tp` each expert's hidden slice (else every expert whole,
        for this rank's token slice), the shared experts' hidden slice."""
        self.tp_group, self.sequence_parallel, self.expert_tp = tp_group, sequence_parallel, expert_tp
        if expert_tp:
            self.experts.shard_hidden(tp_group)
        else:
            self.router.seq_group = tp_group  # capacity is decided over whole sequences
        # each TP rank's router gradient is partial: its token slice's, or (expert_tp) its hidden slice's
        self.router.weight.tp_partial = True
        if self.shared is not None:
            self.shared.shard(tp_group, sequence_parallel)
        if self.shared_gate is not None and sequence_parallel:
            self.shared_gate.weight.tp_partial = True  # each rank gates its own sequence slice

    def local_experts(self, placement) -> list[int]:
        """Logical expert of each of this rank's slots under `placement` (-1 = empty)."""
        spr = placement.slots_per_rank
        return list(placement.slot_expert[self.ep_rank * spr : (self.ep_rank + 1) * spr])

    def slot_shares(self) -> Tensor:
        """[slots] float64: 1 / replicas of the expert in each local slot, 0 for an empty slot (to count each
        expert once in sums over the expert-parallel group)."""
        if self.placement is None:
            return torch.ones(self.experts.num_slots, dtype=torch.float64)
        replicas = self.placement.num_replicas.double()
        ids = torch.tensor(self.experts.logical_ids)
        return torch.where(ids >= 0, 1.0 / replicas[ids.clamp(min=0)], 0.0)

    def relabel(self, placement) -> None:
        """Adopt `placement` without moving data (the caller fills the slots, e.g. from a checkpoint)."""
        self.placement = placement
        self.experts.logical_ids = self.local_experts(placement)

    def take_bias_load(self) -> Tensor:
        """[E] this rank's assignments since the last call (zeros if none), for the expert-bias update; resets."""
        load = self.bias_load if self.bias_load is not None else torch.zeros(self.cfg.num_experts, dtype=torch.long)
        self.bias_load = None
        return load

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shared = None if self.shared is None else self._shared_experts(x)
        x = self._enter_tp(x)
        b, s, d = x.shape
        routing = self.router(x)
        routed = routing.routed
        if self.token_group is not None and self.cfg.aux_loss_coeff > 0:  # the loss needs global fractions
            routed = routed.clone()
            dist.all_reduce(routed, group=self.token_group)
        balance = load_balancing_loss(routing.probs, routed)
        z = router_z_loss(routing.lse)
        slot_ids = routing.expert_ids if self.placement is None else self.placement.route(routing.expert_ids)
        rows, counts, state = self.dispatcher.dispatch(x.reshape(b * s, d), slot_ids)
        y = self.dispatcher.combine(self.experts(rows, counts), routing.weights, state)
        stats = MoEStats(
            expert_load=expert_histogram(routing.expert_ids, self.cfg.num_experts)[0],
            dropped=routing.dropped,
            assignments=routing.expert_ids.numel(),
            aux_loss=balance.detach(),
            z_loss=z.detach(),
        )
        counted = not (self.expert_tp and dist.get_rank(self.tp_group) > 0)  # else the same tokens as TP rank 0
        if not counted:
            stats = stats.nothing()
        if not is_recomputing():  # activation recomputation replays the forward: count it once
            self.stats = stats if self.stats is None or not self.sum_stats else self.stats + stats
            if self.router.expert_bias is not None and self.training and counted:
                self.bias_load = routing.routed if self.bias_load is None else self.bias_load + routing.routed
        aux = self.cfg.aux_loss_coeff * balance + self.cfg.z_loss_coeff * z
        if self.tp_group is not None:
            aux = aux / dist.get_world_size(self.tp_group)  # this rank's share of the batch's loss
        y = self._exit_tp(y.reshape(b, s, d))
        return (y if shared is None else y + shared), aux

    def _shared_experts(self, x: Tensor) -> Tensor:
        """The shared experts' output for the layer input x (as the layer takes it)."""
        y = self.shared(x)
        return y if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * y

    def _enter_tp(self, x: Tensor) -> Tensor:
        """The layer input as this rank computes on it: its slice of every sequence, or (expert_tp) all
        tokens, entering a region whose input gradient is partial over TP."""
        if self.tp_group is None:
            return x
        if self.expert_tp:
            return all_gather_sequence(x, self.tp_group) if self.sequence_parallel else copy_to_tp(x, self.tp_group)
        return x if self.sequence_parallel else scatter_to_sequence(x, self.tp_group)

    def _exit_tp(self, y: Tensor) -> Tensor:
        """Undo `_enter_tp` on the output (expert_tp: sum the hidden slices' partial outputs)."""
        if self.tp_group is None:
            return y
        if self.expert_tp:
            return reduce_scatter_sequence(y, self.tp_group) if self.sequence_parallel else reduce_from_tp(y, self.tp_group)
        return y if self.sequence_parallel else gather_from_sequence(y, self.tp_group)
