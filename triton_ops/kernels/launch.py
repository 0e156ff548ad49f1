"""Launch settings shared by the kernels: block sizes, program counts, and the interpreter's limits."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ops.backend import interpreting

# The interpreter computes tl.dot of bf16 operands wrongly (measured with triton 3.9: errors of 2.5e10 on products
# of unit-scale values); the kernels upcast the operands to fp32 there (exact for bf16 products, as the fp32
# accumulation of a GPU's bf16 dot).
UPCAST_DOT = interpreting()


def pow2(n: int, least: int = 1) -> int:
    """Smallest power of two >= max(n, least)."""
    return max(triton.next_power_of_2(max(n, 1)), least)


def accumulator(t: Tensor):
    """The tl dtype to accumulate `t`'s values in: fp64 for fp64, else fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def persistent_programs(device: torch.device, tiles: int) -> int:
    """Programs of a persistent kernel: one per SM (a few in the interpreter), at most one per tile."""
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        slots = 4
    return max(1, min(slots, tiles))
