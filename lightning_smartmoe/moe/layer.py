"""The MoE FFN layer: router -> dispatcher -> experts -> dispatcher."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe.moe.config import MoEConfig
from lightning_smartmoe.moe.dispatcher import TokenDispatcher
from lightning_smartmoe.moe.experts import GroupedExperts
from lightning_smartmoe.moe.losses import load_balancing_loss, router_z_loss
from lightning_smartmoe.moe.router import Router
from triton_ops import expert_histogram


@dataclass
class MoEStats:
    """Detached figures of the last forward on this rank."""

    expert_load: Tensor  # [E] int64 assignments computed per logical expert (after drops)
    dropped: Tensor  # [] int64 assignments dropped for capacity
    assignments: int  # T * k
    aux_loss: Tensor  # [] load-balancing loss (unscaled by its coefficient)
    z_loss: Tensor  # [] router z-loss (unscaled)


class MoELayer(nn.Module):
    """Mixture-of-experts FFN. forward(x [B, S, d]) -> (y [B, S, d], scaled aux loss []).

    Built with all experts; `distribute` keeps this rank's share and wires the dispatcher to an
    expert-parallel group. The returned aux loss (aux_loss_coeff * balance + z_loss_coeff * z) must be
    added to the training loss.
    """

    def __init__(self, d_model: int, ffn_hidden: int, cfg: MoEConfig, out_std: float = 0.02) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_hidden or ffn_hidden, out_std)
        self.dispatcher = TokenDispatcher(cfg.num_experts)
        self.token_group: dist.ProcessGroup | None = None
        self.stats: MoEStats | None = None

    def distribute(self, ep_group: dist.ProcessGroup, token_group: dist.ProcessGroup) -> None:
        """Shard the experts contiguously over `ep_group`.

        Args:
            ep_group: ranks that hold different experts.
            token_group: ranks whose tokens together form the global batch (for the aux-loss statistics).
        """
        ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        local = self.cfg.num_experts // ep
        self.experts.keep_slots(list(range(rank * local, (rank + 1) * local)))
        self.dispatcher = TokenDispatcher(local, ep_group)
        self.token_group = token_group

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, s, d = x.shape
        routing = self.router(x)
        routed = routing.routed
        if self.token_group is not None:
            routed = routed.clone()
            dist.all_reduce(routed, group=self.token_group)
        balance = load_balancing_loss(routing.probs, routed)
        z = router_z_loss(routing.logits)
        rows, counts, state = self.dispatcher.dispatch(x.reshape(b * s, d), routing.expert_ids)
        y = self.dispatcher.combine(self.experts(rows, counts), routing.weights, state)
        self.stats = MoEStats(
            expert_load=expert_histogram(routing.expert_ids, self.cfg.num_experts),
            dropped=routing.dropped,
            assignments=routing.expert_ids.numel(),
            aux_loss=balance.detach(),
            z_loss=z.detach(),
        )
        aux = self.cfg.aux_loss_coeff * balance + self.cfg.z_loss_coeff * z
        return y.reshape(b, s, d), aux
