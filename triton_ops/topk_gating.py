"""Top-k gating: logits -> softmax or sigmoid scores -> top-k (optionally biased, optionally within the best
expert groups) -> renormalise, with the logsumexp for the z-loss.

`topk_softmax` (plain softmax top-k) has a Triton kernel; `topk_gating` runs it for the plain softmax case and
its torch implementation for sigmoid scores, a selection bias or group-limited routing, also under
MOE_KERNELS=triton (those have no kernel of their own).
"""

import torch
from torch import Tensor

from triton_ops.backend import kernels_for


def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax over experts, then the k largest probabilities per token.

    Args:
        logits: [T, E] router logits (the math runs in fp32, or fp64 for fp64 logits).
        k: experts per token, 1 <= k <= E.
        renormalize: rescale the k chosen probabilities to sum to 1.

    Returns (all differentiable except indices; fp32, or fp64 for fp64 logits):
        probs: [T, E] softmax probabilities.
        weights: [T, k] gate weights of the chosen experts.
        indices: [T, k] int64 chosen expert ids, most probable first.
        lse: [T] logsumexp of each token's logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"topk_softmax: logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"topk_softmax: logits must be floating point, got {logits.dtype}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"topk_softmax: k={k} must be between 1 and the number of experts {logits.shape[1]}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # e.g. bf16 logits under autocast
    if kernels_for(logits) == "triton":
        from triton_ops.kernels.router import topk_softmax_triton

        return topk_softmax_triton(logits, k, renormalize)
    return topk_softmax_reference(logits, k, renormalize)


def topk_softmax_reference(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch implementation of `topk_softmax` (for fp32 or fp64 logits). Among equal probabilities the lowest
    expert id comes first, as in the Triton kernel; at 64 experts two argmax passes take about half of torch.topk's
    time on a CPU."""
    top = logits.amax(dim=-1, keepdim=True).detach()
    exp = torch.exp(logits - top)
    total = exp.sum(dim=-1, keepdim=True)
    probs = exp / total
    with torch.no_grad():
        rest = probs.clone()
        chosen = []
        for _ in range(k):
            chosen.append(rest.argmax(dim=-1, keepdim=True))
            rest.scatter_(1, chosen[-1], -1.0)
        indices = torch.cat(chosen, dim=1)
    weights = probs.gather(1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, indices, (top + total.log()).squeeze(1)


def topk_gating(logits: Tensor, k: int, score: str = "softmax", renormalize: bool = True, bias: Tensor | None = None,
                groups: int = 1, group_top_k: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Router scores, then the k best experts per token.

    Args:
        logits: [T, E] router logits (the math runs in fp32, or fp64 for fp64 logits).
        k: experts per token.
        score: "softmax" (probabilities) or "sigmoid" (independent scores, DeepSeek-V3).
        renormalize: rescale the k chosen scores to sum to 1.
        bias: [E] added to the scores to choose the experts, not to the weights (aux-loss-free balancing).
        groups, group_top_k: choose only among the experts of the group_top_k best of `groups` equal groups,
            a group ranked by the sum of its best k // group_top_k (biased) scores.

    Returns (as `topk_softmax`): probs [T, E] (softmax probabilities; sigmoid scores normalised to sum to 1 per
    token, for the load-balancing loss), weights [T, k] (the chosen experts' scores), indices [T, k] int64 (best
    first), lse [T] (logsumexp of the logits).
    """
    if score == "softmax" and bias is None and groups == 1:
        return topk_softmax(logits, k, renormalize)
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"topk_gating: score={score!r} must be softmax or sigmoid")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return topk_gating_reference(logits, k, score, renormalize, bias, groups, group_top_k)


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """[T, k] indices of the k largest of each row, largest first, the lowest index first among equals."""
    rest = scores.clone()
    chosen = []
    for _ in range(k):
        chosen.append(rest.argmax(dim=-1, keepdim=True))
        rest.scatter_(1, chosen[-1], -torch.inf)
    return torch.cat(chosen, dim=1)


def topk_gating_reference(logits: Tensor, k: int, score: str, renormalize: bool, bias: Tensor | None, groups: int,
                          group_top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch implementation of `topk_gating` (fp32 or fp64 logits)."""
    lse = torch.logsumexp(logits, dim=-1)
    scores = torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)
    with torch.no_grad():
        select = scores if bias is None else scores + bias.to(scores.dtype)
        if groups > 1:
            t, e = select.shape
            per_group = select.view(t, groups, e // groups)
            group_score = per_group.topk(max(1, k // group_top_k), dim=-1).values.sum(-1)
            kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, _top_indices(group_score, group_top_k), True)
            select = per_group.masked_fill(~kept.unsqueeze(-1), -torch.inf).view(t, e)
        indices = _top_indices(select, k)
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    probs = scores if score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    return probs, weights, indices, lse
