"""Grouped two-layer expert FFN: per group e, gelu(x_e @ w1[e]) @ w2[e], or with a third weight (SwiGLU)
(silu(x_e @ w1[e]) * (x_e @ w3[e])) @ w2[e].

Two implementations: a loop over the groups that runs each group's whole FFN (and, in backward, each group's
whole backward) before the next one (the reference; exact, for float64, and on a CPU the faster: a group's
activations are still in cache when its activation and second matmul read them), and `grouped_mm` calls with the
activation between them (on CUDA, with no host sync; under MOE_KERNELS=triton the Triton grouped GEMM). On CPU
the faster of the two is measured at first use per shape; both give bitwise the same result there.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_ops.backend import fastest, kernels_for, with_backward
from triton_ops.grouped_mm import check_grouped, grouped_mm


def expert_ffn(x: Tensor, w1: Tensor, w2: Tensor, counts: Tensor | list[int], w3: Tensor | None = None) -> Tensor:
    """y[rows of group e] = gelu(x[rows] @ w1[e]) @ w2[e], or with w3 (SwiGLU) (silu(x[rows] @ w1[e]) *
    (x[rows] @ w3[e])) @ w2[e].

    Args:
        x: [N, d] rows grouped by expert.
        w1: [E, d, h] (SwiGLU: the gate), w3: None or [E, d, h] (the up projection), w2: [E, h, d_out], in x's
            dtype.
        counts: rows per group, [E] integers (tensor or list), summing to at most N.

    Returns:
        [N, d_out] (differentiable w.r.t. x and the weights); rows past sum(counts) are zero.
    """
    counts = check_grouped(x, w1, counts, "expert_ffn", "w1")
    if w2.dim() != 3 or w2.shape[:2] != w1.shape[::2] or w2.dtype != x.dtype or w2.device != x.device:
        raise ValueError(
            f"expert_ffn: w2 must be [E={w1.shape[0]}, h={w1.shape[2]}, d_out] in {x.dtype} on {x.device}; "
            f"got {tuple(w2.shape)} {w2.dtype} on {w2.device}"
        )
    if w3 is not None and (w3.shape != w1.shape or w3.dtype != x.dtype or w3.device != x.device):
        raise ValueError(f"expert_ffn: w3 must be like w1, {tuple(w1.shape)} {x.dtype}; got {tuple(w3.shape)} {w3.dtype}")
    if x.dtype == torch.float64:
        return expert_ffn_reference(x, w1, w2, counts, w3)
    if x.is_cuda or kernels_for(x) == "triton":
        return _grouped(x, w1, w2, counts, w3)
    key = ("expert_ffn", x.device.type, x.dtype, w3 is None, *w1.shape, w2.shape[2], max(x.shape[0], 1).bit_length())
    impls = {"loop": expert_ffn_reference, "grouped": _grouped}
    choice = fastest(key, {n: with_backward(f, x, w1, w2, counts, w3) for n, f in impls.items()}, x.device)
    return impls[choice](x, w1, w2, counts, w3)


def _grouped(x: Tensor, w1: Tensor, w2: Tensor, counts: Tensor, w3: Tensor | None = None) -> Tensor:
    if w3 is None:
        return grouped_mm(F.gelu(grouped_mm(x, w1, counts)), w2, counts)
    return grouped_mm(F.silu(grouped_mm(x, w1, counts)) * grouped_mm(x, w3, counts), w2, counts)


def expert_ffn_reference(x: Tensor, w1: Tensor, w2: Tensor, counts: Tensor, w3: Tensor | None = None) -> Tensor:
    """torch implementation of `expert_ffn` (counts an int64 tensor, read on the host)."""
    counts = tuple(counts.tolist())
    return _LoopExpertFFN.apply(x, w1, w2, counts) if w3 is None else _LoopSwiGLUFFN.apply(x, w1, w2, w3, counts)


class _LoopExpertFFN(torch.autograd.Function):
    """Saves each group's pre-activations and GELU output as tensors of their own: buffers of a group's size are
    reused by the allocator from step to step, where one [N, h] buffer (32 MB at 8192 x 1024 fp32) would be fresh
    memory, page-faulted in, every step."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, counts: tuple[int, ...]) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], w2.shape[2])
        pre, act = [], []
        start = 0
        for e, n in enumerate(counts):
            pre.append(torch.mm(x[start : start + n], w1[e]))
            act.append(F.gelu(pre[-1]))
            torch.mm(act[-1], w2[e], out=out[start : start + n])
            start += n
        out[start:] = 0
        ctx.save_for_backward(x, w1, w2, *pre, *act)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, w1, w2, *saved = ctx.saved_tensors
        pre, act = saved[: len(ctx.counts)], saved[len(ctx.counts) :]
        grad = grad.contiguous()
        gx, gw1, gw2 = torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if n:
                torch.mm(act[e].t(), grad[rows], out=gw2[e])
                g_pre = torch.ops.aten.gelu_backward(grad[rows] @ w2[e].t(), pre[e])
                torch.mm(x[rows].t(), g_pre, out=gw1[e])
                torch.mm(g_pre, w1[e].t(), out=gx[rows])
            else:
                gw1[e].zero_()
                gw2[e].zero_()
            start += n
        gx[start:] = 0
        return gx, gw1, gw2, None


class _LoopSwiGLUFFN(torch.autograd.Function):
    """The SwiGLU loop: per group, gate = x @ w1, up = x @ w3 (both saved), h = silu(gate) * up, y = h @ w2;
    backward recomputes silu(gate) and h per group."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, counts: tuple[int, ...]) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], w2.shape[2])
        gates, ups = [], []
        start = 0
        for e, n in enumerate(counts):
            rows = x[start : start + n]
            gates.append(torch.mm(rows, w1[e]))
            ups.append(torch.mm(rows, w3[e]))
            torch.mm(F.silu(gates[-1]) * ups[-1], w2[e], out=out[start : start + n])
            start += n
        out[start:] = 0
        ctx.save_for_backward(x, w1, w2, w3, *gates, *ups)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        x, w1, w2, w3, *saved = ctx.saved_tensors
        gates, ups = saved[: len(ctx.counts)], saved[len(ctx.counts) :]
        grad = grad.contiguous()
        gx, gw1, gw2, gw3 = torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w3)
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if n:
                act = F.silu(gates[e])
                torch.mm((act * ups[e]).t(), grad[rows], out=gw2[e])
                g_h = grad[rows] @ w2[e].t()
                g_up = g_h * act
                g_gate = torch.ops.aten.silu_backward(g_h * ups[e], gates[e])
                torch.mm(x[rows].t(), g_gate, out=gw1[e])
                torch.mm(x[rows].t(), g_up, out=gw3[e])
                torch.mm(g_gate, w1[e].t(), out=gx[rows])
                gx[rows].addmm_(g_up, w3[e].t())
            else:
                gw1[e].zero_()
                gw2[e].zero_()
                gw3[e].zero_()
            start += n
        gx[start:] = 0
        return gx, gw1, gw2, gw3, None
