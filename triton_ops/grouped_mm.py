"""Grouped matrix multiply: one matmul per expert over its contiguous block of rows.

Three implementations compute the same thing: a loop of `torch.mm` per group (the reference; exact, and the
only one for float64), `torch.nn.functional.grouped_mm` (one library call; on CPU bitwise equal to the loop),
and the persistent Triton kernel. Which runs: float64 -> the loop; otherwise MOE_KERNELS if set (torch:
`F.grouped_mm`, on CPU the faster of it and the loop), else on CUDA the faster of Triton and `F.grouped_mm`,
measured at first use per shape (`backend.fastest`). On CPU `F.grouped_mm` is a candidate only where it needs no
padding, so that whichever is measured faster, the result is the same to the bit.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_ops.backend import fastest, kernels_for, kernels_forced, with_backward
from triton_ops.checks import check_counts
from triton_ops.permute import zero_rows_from

# what F.grouped_mm takes: on CPU (measured) these three; on CUDA it documents bf16 only
LIBRARY_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor | list[int]) -> Tensor:
    """y[rows of group e] = x[rows of group e] @ w[e].

    Args:
        x: [N, d] rows grouped by expert.
        w: [E, d, h] per-expert weights, in x's dtype, on x's device.
        counts: rows per group, [E] integers (a tensor, on any device, or a list), summing to at most N.

    Returns:
        [N, h] (differentiable w.r.t. x and w); rows past sum(counts) are zero and get zero gradient, a group
        with no rows gets a zero weight gradient.
    """
    counts = check_grouped(x, w, counts, "grouped_mm", "w")
    return IMPLEMENTATIONS[choose_grouped_mm(x, w, counts)](x, w, counts)


def check_grouped(x: Tensor, w: Tensor, counts: Tensor | list[int], op: str, w_name: str) -> Tensor:
    """Validate grouped-GEMM arguments; returns counts as an int64 tensor (on x's device if it was a list)."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"{op}: x must be [N, d] and {w_name} [E, d, h] with the same d; got x {tuple(x.shape)}, "
            f"{w_name} {tuple(w.shape)}"
        )
    if x.dtype != w.dtype or not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x and {w_name} must have the same floating-point dtype, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{op}: x and {w_name} must be on one device, got {x.device} and {w.device}")
    if w.shape[0] < 1:
        raise ValueError(f"{op}: {w_name} must hold at least one group")
    if not isinstance(counts, Tensor):
        if len(counts) != w.shape[0] or any(n < 0 for n in counts) or sum(counts) > x.shape[0]:
            raise ValueError(
                f"{op}: counts must be {w.shape[0]} non-negative integers (one per weight group) summing to at "
                f"most the {x.shape[0]} rows of x; got {len(counts)} summing to {sum(counts)}"
            )
        counts = torch.tensor(counts, dtype=torch.long)
    check_counts(counts, x.shape[0], w.shape[0], op)
    return counts.to(x.device, torch.long, non_blocking=True)


def choose_grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> str:
    """'loop', 'library' (F.grouped_mm) or 'triton' for these arguments."""
    if x.dtype == torch.float64:
        return "loop"
    kernels = kernels_for(x)
    if kernels == "triton" and kernels_forced():
        return "triton"
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    names = ["library"] if x.dtype in LIBRARY_DTYPES.get(x.device.type, ()) and (x.is_cuda or aligned) else []
    names += ["triton"] if kernels == "triton" else [] if x.is_cuda else ["loop"]
    if not names:  # CUDA, torch path, a dtype F.grouped_mm lacks: the loop (it reads the counts on the host)
        return "loop"
    key = ("grouped_mm", x.device.type, x.dtype, w.shape[0], w.shape[1], w.shape[2], max(x.shape[0], 1).bit_length())
    return fastest(key, {n: with_backward(IMPLEMENTATIONS[n], x, w, counts) for n in names}, x.device)


def _triton(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    from triton_ops.kernels.grouped_gemm import grouped_mm_triton

    return grouped_mm_triton(x, w, counts)


def grouped_mm_reference(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """torch implementation of `grouped_mm` (counts an int64 tensor): a loop of torch.mm, reading the counts on
    the host."""
    return _LoopGroupedMM.apply(x, w, tuple(counts.tolist()))


class _LoopGroupedMM(torch.autograd.Function):
    """Forward and backward write each expert's block straight into one output buffer: no per-expert
    tensors are concatenated or stacked (which would copy every activation and weight gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: tuple[int, ...]) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x[start : start + n], w[e], out=out[start : start + n])
            start += n
        out[start:] = 0
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if gx is not None and n:
                torch.mm(grad[rows], w[e].t(), out=gx[rows])
            if gw is not None:
                if n:
                    torch.mm(x[rows].t(), grad[rows], out=gw[e])
                else:
                    gw[e].zero_()
            start += n
        if gx is not None:
            gx[start:] = 0
        return gx, gw, None


class _LibraryGroupedMM(torch.autograd.Function):
    """F.grouped_mm for forward and both backward products. Its operands' strides must be multiples of 16 bytes
    (and their storage 16-byte aligned): x and w are zero-padded along d and h where they are not, and the
    padding cut off again. It leaves rows past the last offset unwritten; they are zeroed here."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        h = w.shape[2]
        offs = counts.cumsum(0).to(torch.int32)
        xp, wp = _aligned(x, 1), _aligned(_aligned(w, 2), 1)
        out = F.grouped_mm(xp, wp, offs=offs)[:, :h]
        ctx.save_for_backward(xp, wp, offs)
        ctx.shape = x.shape[1], h
        return zero_rows_from(out, offs[-1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        xp, wp, offs = ctx.saved_tensors
        d, h = ctx.shape
        gp = _aligned(grad.contiguous(), 1, wp.shape[2])
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = zero_rows_from(F.grouped_mm(gp, wp.transpose(1, 2), offs=offs)[:, :d], offs[-1])
        if ctx.needs_input_grad[1]:
            gw = F.grouped_mm(xp.t(), gp, offs=offs)
            gw = gw if gw.shape[1:] == (d, h) else gw[:, :d, :h].contiguous()
        return gx, gw, None


def _aligned(t: Tensor, dim: int, size: int | None = None) -> Tensor:
    """`t` contiguous, 16-byte aligned, with dimension `dim` zero-padded to `size` (default: the next multiple of
    16 bytes)."""
    per = 16 // t.element_size()
    size = size if size is not None else -(-t.shape[dim] // per) * per
    if size != t.shape[dim]:
        pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
        return F.pad(t, pad)
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


IMPLEMENTATIONS = {"loop": grouped_mm_reference, "library": _LibraryGroupedMM.apply, "triton": _triton}
