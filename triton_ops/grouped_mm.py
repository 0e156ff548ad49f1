"""Grouped matrix multiply: one matmul per expert over its contiguous block of rows."""

import torch
from torch import Tensor


class _GroupedMM(torch.autograd.Function):
    """Forward and backward write each expert's block straight into one output buffer: no per-expert
    tensors are concatenated or stacked (which would copy every activation and weight gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: tuple[int, ...]) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x[start : start + n], w[e], out=out[start : start + n])
            start += n
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
        return gx, gw, None


def grouped_mm(x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """y[rows of group e] = x[rows of group e] @ w[e].

    Args:
        x: [N, d] rows grouped by expert, N = sum(counts).
        w: [E, d, h] per-expert weights, in x's dtype.
        counts: rows per group, len E.

    Returns:
        [N, h] (differentiable w.r.t. x and w; a group with no rows gets a zero weight gradient).
    """
    if len(counts) != w.shape[0]:
        raise ValueError(f"grouped_mm: {len(counts)} group counts for {w.shape[0]} weight groups")
    return _GroupedMM.apply(x.contiguous(), w, tuple(counts))
