"""Token-to-expert router: the gates naive, gshard and switch, with optional capacity dropping; the naive gate
with softmax or sigmoid scores, group-limited routing and the aux-loss-free expert bias."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import init
from lightning_smartmoe.moe.config import MoEConfig
from lightning_smartmoe.tensor_parallel import rank_random
from triton_ops import expert_histogram, topk_gating


@dataclass
class Routing:
    """One router decision for T = B * S tokens.

    expert_ids: [T, k] int64 logical expert per assignment, -1 where dropped (capacity or random routing).
    weights: [T, k] combine weights (differentiable).
    probs: [T, E] router probabilities (differentiable, for the aux loss; sigmoid scores normalised per token).
    lse: [T] logsumexp of the router logits (differentiable, for the z-loss).
    (Router math runs in fp32, or fp64 for an fp64 model.)
    routed: [E] int64 assignments per expert before any drop (this rank's tokens).
    dropped: [] int64 assignments dropped for lack of capacity.
    """

    expert_ids: Tensor
    weights: Tensor
    probs: Tensor
    lse: Tensor
    routed: Tensor
    dropped: Tensor


def capacity_mask(expert_ids: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which assignments fit each expert's per-sequence capacity.

    Within a sequence, all first choices queue before all second choices, each in token order
    (GShard's priority). Capacity is per sequence, so the decision does not depend on how the batch
    is split over ranks or micro-batches.

    Args:
        expert_ids: [B, S, k] int64 expert per assignment (-1 = already dropped).
        num_experts: E.
        capacity: slots per expert per sequence.

    Returns:
        [B, S, k] bool, True where the assignment is kept.
    """
    b, s, k = expert_ids.shape
    queued = expert_ids.transpose(1, 2).reshape(b, k * s)  # choice-major queue per sequence
    onehot = torch.nn.functional.one_hot(queued.clamp(min=0), num_experts) * (queued >= 0).unsqueeze(-1)
    position = onehot.cumsum(dim=1) * onehot  # 1-based position of each assignment in its expert's queue
    keep = (position.sum(dim=-1) <= capacity) & (queued >= 0)
    return keep.reshape(b, k, s).transpose(1, 2)


class Router(nn.Module):
    """Linear router over d_model features with one of three gates.

    - naive: top-k of the softmax (or of the sigmoid scores, `score`), weights renormalised over the k chosen
      unless `renormalize` is off, times `scaling_factor`; with `groups` > 1 only from the best `group_top_k`
      expert groups. With `bias_update_rate` > 0 the experts are chosen by score + `expert_bias` [E] (a buffer,
      checkpointed, not trained by gradients: `update_bias` moves it after each optimizer step towards equal
      loads), the weights still being the scores (aux-loss-free balancing, DeepSeek-V3).
    - gshard: top-2, weights renormalised; in training the 2nd expert is kept with probability 2 * w2.
    - switch: top-1 with the raw top-1 probability as weight; in training the router input is
      multiplied by U(1 - jitter_eps, 1 + jitter_eps) noise.
    Every gate honours `capacity_factor` (per-sequence capacity ceil(cf * S * k / E)) when it is set.

    With `seq_group` set, each rank of that group routes a contiguous slice of every sequence (tensor
    parallelism); capacity is still decided over whole sequences, from the gathered expert choices, and the
    random draws come from each rank's own stream.
    """

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = init.normal_(nn.Parameter(torch.empty(cfg.num_experts, d_model)), std=0.02)
        bias = init.zeros_(torch.empty(cfg.num_experts)) if cfg.bias_update_rate > 0 else None
        self.register_buffer("expert_bias", bias)  # [E] or None
        self.seq_group: dist.ProcessGroup | None = None

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """Move `expert_bias` by bias_update_rate towards balance: up for the experts below the mean of `load` [E]
        (assignments per expert over the global batch since the last update), down for those above."""
        load = load.to(self.expert_bias.device, torch.float64)
        self.expert_bias += (self.cfg.bias_update_rate * torch.sign(load.mean() - load)).to(self.expert_bias.dtype)

    def capacity(self, seq_len: int) -> int:
        """Per-sequence slots per expert."""
        cfg = self.cfg
        return math.ceil(cfg.capacity_factor * seq_len * cfg.top_k / cfg.num_experts)

    def forward(self, x: Tensor) -> Routing:
        """Route x [B, S, d]."""
        cfg = self.cfg
        b, s, _ = x.shape
        if cfg.gate == "switch" and self.training and cfg.jitter_eps > 0:
            with rank_random(self.seq_group, x.device):  # each rank's own token slice
                x = x * torch.empty_like(x).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = nn.functional.linear(x.reshape(b * s, -1).to(dtype), self.weight.to(dtype))
        probs, weights, expert_ids, lse = topk_gating(
            logits, cfg.top_k, cfg.score, renormalize=cfg.gate != "switch" and cfg.renormalize, bias=self.expert_bias,
            groups=cfg.groups, group_top_k=cfg.group_top_k,
        )
        if cfg.scaling_factor != 1.0:
            weights = weights * cfg.scaling_factor
        routed, _ = expert_histogram(expert_ids, cfg.num_experts)
        if cfg.gate == "gshard" and self.training and cfg.random_routing:
            with rank_random(self.seq_group, x.device):
                keep_second = torch.rand(b * s, device=x.device) < 2 * weights[:, 1].detach()
            expert_ids = torch.stack([expert_ids[:, 0], expert_ids[:, 1].where(keep_second, -1)], dim=1)
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        if cfg.capacity_factor is not None:
            keep = self._capacity_keep(expert_ids.reshape(b, s, -1)).reshape(b * s, -1)
            dropped = ((expert_ids >= 0) & ~keep).sum()
            expert_ids = expert_ids.where(keep, -1)
        return Routing(expert_ids, weights, probs, lse, routed, dropped)

    def _capacity_keep(self, expert_ids: Tensor) -> Tensor:
        """[B, S, k] bool capacity mask of this rank's [B, S, k] choices, decided over whole sequences."""
        if self.seq_group is None:
            return capacity_mask(expert_ids, self.cfg.num_experts, self.capacity(expert_ids.shape[1]))
        parts = [torch.empty_like(expert_ids) for _ in range(dist.get_world_size(self.seq_group))]
        dist.all_gather(parts, expert_ids.contiguous(), group=self.seq_group)
        full = torch.cat(parts, dim=1)
        keep = capacity_mask(full, self.cfg.num_experts, self.capacity(full.shape[1]))
        s = expert_ids.shape[1]
        start = dist.get_rank(self.seq_group) * s
        return keep[:, start : start + s]
