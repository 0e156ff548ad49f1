"""Per-expert token histogram."""

import torch
from torch import Tensor


def expert_histogram(ids: Tensor, num_bins: int) -> Tensor:
    """Count how often each id in [0, num_bins) occurs; negative ids (dropped) are ignored.

    Args:
        ids: int64 tensor of any shape.
        num_bins: number of experts (or slots).

    Returns:
        [num_bins] int64 counts.
    """
    flat = ids.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=num_bins)[:num_bins]
