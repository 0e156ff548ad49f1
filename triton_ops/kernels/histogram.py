"""Per-expert counts and their prefix sums in one single-program kernel (no atomics: deterministic)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ops.kernels.launch import pow2


@triton.jit
def _histogram_kernel(ids, counts, offsets, n, NUM_BINS, BLOCK: tl.constexpr, BINS: tl.constexpr):
    # bin b holds id b - 1: bin 0 the dropped ids (-1) and the padding
    acc = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.histogram(tl.load(ids + offs, mask=offs < n, other=-1).to(tl.int32) + 1, BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts + bins - 1, acc.to(tl.int64), mask=(bins >= 1) & (bins <= NUM_BINS))
    tl.store(offsets + bins, tl.cumsum(tl.where(bins >= 1, acc, 0), 0).to(tl.int64), mask=bins <= NUM_BINS)


def expert_histogram_triton(ids: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Triton implementation of `triton_ops.expert_histogram` (same arguments and results)."""
    flat = ids.reshape(-1).contiguous()
    counts = torch.empty(num_bins, dtype=torch.long, device=ids.device)
    offsets = torch.empty(num_bins + 1, dtype=torch.long, device=ids.device)
    _histogram_kernel[(1,)](flat, counts, offsets, flat.numel(), num_bins, BLOCK=1024, BINS=pow2(num_bins + 1))
    return counts, offsets
