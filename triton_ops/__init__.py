"""MoE token-routing primitives.

Each primitive has a torch reference implementation; Triton kernels slot in behind the same signatures.
"""

from triton_ops.grouped_mm import grouped_mm
from triton_ops.histogram import expert_histogram
from triton_ops.permute import permute, unpermute
from triton_ops.topk_gating import topk_softmax

__all__ = ["expert_histogram", "grouped_mm", "permute", "topk_softmax", "unpermute"]
