"""Per-expert assignment counts and their prefix sums."""

import torch
from torch import Tensor

from triton_ops.backend import kernels_for
from triton_ops.checks import check_ids


def expert_histogram(ids: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """How often each id in [0, num_bins) occurs, and where each id's block starts; -1 (dropped) is skipped.

    Args:
        ids: integer tensor of any shape, values in [-1, num_bins).
        num_bins: number of experts (or slots).

    Returns:
        counts: [num_bins] int64.
        offsets: [num_bins + 1] int64, offsets[e] = counts[:e].sum() (so offsets[-1] = kept ids).
    """
    check_ids(ids, num_bins, "expert_histogram", "ids")
    if kernels_for(ids) == "triton":
        from triton_ops.kernels.histogram import expert_histogram_triton

        return expert_histogram_triton(ids, num_bins)
    return expert_histogram_reference(ids, num_bins)


def expert_histogram_reference(ids: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """torch implementation of `expert_histogram`."""
    flat = ids.reshape(-1).long() + 1  # bin 0 takes the dropped ids; scatter_add, as bincount syncs on CUDA
    counts = torch.zeros(num_bins + 1, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))[1:]
    return counts, torch.nn.functional.pad(counts.cumsum(0), (1, 0))
