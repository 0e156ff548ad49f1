"""MoE token-routing primitives and the grouped expert FFN.

Each op has a torch reference implementation (`<op>_reference`) and a Triton one of the same signature
(`triton_ops.kernels`), chosen per call by `triton_ops.backend`: Triton for CUDA tensors, torch elsewhere,
`MOE_KERNELS=torch|triton` to override.
"""

from triton_ops.expert_ffn import expert_ffn
from triton_ops.grouped_mm import grouped_mm
from triton_ops.histogram import expert_histogram
from triton_ops.permute import permute, unpermute
from triton_ops.topk_gating import topk_gating, topk_softmax

__all__ = ["expert_ffn", "expert_histogram", "grouped_mm", "permute", "topk_gating", "topk_softmax", "unpermute"]
