"""Top-k softmax gating: logits -> softmax -> top-k -> renormalise, with the logsumexp for the z-loss."""

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
