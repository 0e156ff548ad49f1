"""Sums of squares of gradients for clipping by the global norm: each tensor reduced at its own precision (float32
at least, as torch.nn.utils.clip_grad_norm_ and Megatron do), the results carried in float64. A float32 copy of a
gradient is never made in float64: that copy cost about 100x the reduction (9 ns against 0.1 ns per element, one
CPU thread)."""

from collections import defaultdict

import torch
from torch import Tensor


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """[len(tensors)] float64: each tensor's sum of squares (one fused reduction per dtype)."""
    out = torch.zeros(len(tensors), dtype=torch.float64, device=tensors[0].device if tensors else None)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_dtype[t.dtype].append(i)
    for dtype, index in by_dtype.items():
        norms = torch._foreach_norm([tensors[i] for i in index], 2, dtype=_norm_dtype(dtype))
        out[index] = torch.stack(norms).double().square()
    return out


def squared_row_norms(tensor: Tensor) -> Tensor:
    """[tensor.shape[0]] float64: the sum of squares of each row (e.g. each expert slot of a [slots, ...] weight)."""
    return torch.linalg.vector_norm(tensor.flatten(1), dim=1, dtype=_norm_dtype(tensor.dtype)).double().square()
