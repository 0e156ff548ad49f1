"""Top-k softmax gating."""

import torch
from torch import Tensor


def topk_softmax(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over experts, then the k largest probabilities per token.

    Args:
        logits: [T, E] router logits (computed in fp32, or fp64 if given fp64).
        k: experts per token.
        renormalize: rescale the k chosen probabilities to sum to 1.

    Returns:
        probs: [T, E] softmax probabilities (differentiable).
        weights: [T, k] gate weights of the chosen experts (differentiable).
        indices: [T, k] int64 chosen expert ids, most probable first.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, indices
