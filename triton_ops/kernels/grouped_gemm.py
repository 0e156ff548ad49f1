"""Persistent grouped GEMM: a fixed grid of programs walks all groups' output tiles, reading the group bounds on
the device, so nothing waits for the host to learn the group sizes.

Forward and the input gradient: out[rows of g] = a[rows of g] @ b[g] (for the input gradient, b[g] is the weight
transposed, by strides). Rows past the last group are written as zeros. Weight gradient: out[g] = x[rows of g]^T @
grad[rows of g], zero for an empty group.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ops.backend import interpreting
from triton_ops.kernels.launch import UPCAST_DOT, persistent_programs


def _configs(names: tuple[str, str, str], sizes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, s[:3])), num_warps=s[3], num_stages=s[4]) for s in sizes]


_ROW_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)]
_WEIGHT_TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 128, 4, 3)]
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def _tuned(kernel, names: tuple[str, str, str], sizes, key: list[str]):
    """Autotuned on a GPU; one small fixed tile in the interpreter (where timing would say nothing)."""
    if interpreting():
        return kernel
    return triton.autotune(configs=_configs(names, sizes), key=key)(kernel)


@triton.jit
def _grouped_rows_mm(a, b, out, starts, E, N, K, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # groups g < E: rows starts[g]..starts[g+1]; "group" E: rows starts[E]..starts[E+1], zero-filled
    tiles_n = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    first = 0
    for g in range(0, E + 1):
        lo = tl.load(starts + g)
        hi = tl.load(starts + g + 1)
        group_tiles = tl.cdiv(hi - lo, BLOCK_M) * tiles_n
        while tile < first + group_tiles:
            local = tile - first
            rm = lo + (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if g < E:
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(a + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak,
                                mask=(rm < hi)[:, None] & (rk < K)[None, :], other=0.0)
                    w = tl.load(b + tl.cast(g, tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                                mask=(rk < K)[:, None] & (rn < N)[None, :], other=0.0)
                    if UPCAST:
                        x, w = x.to(tl.float32), w.to(tl.float32)
                    acc = tl.dot(x, w, acc, input_precision=PRECISION)
            tl.store(out + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(out.dtype.element_ty),
                     mask=(rm < hi)[:, None] & (rn < N)[None, :])
            tile += tl.num_programs(0)
        first += group_tiles


@triton.jit
def _grouped_weight_grad(x, g, out, starts, E, D, N, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[e] [D, N] = x[rows of e]^T @ g[rows of e]; x [rows, D], g [rows, N] contiguous; tiles BLOCK_M x BLOCK_N
    # of out, the rows reduced BLOCK_K at a time
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = tl.cdiv(D, BLOCK_M) * tiles_n
    for tile in range(tl.program_id(0), E * per_group, tl.num_programs(0)):
        e = tile // per_group
        local = tile % per_group
        rd = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        lo = tl.load(starts + e)
        hi = tl.load(starts + e + 1)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m0 in range(lo, hi, BLOCK_K):
            rm = m0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x + rm.to(tl.int64)[None, :] * D + rd[:, None], mask=(rm < hi)[None, :] & (rd < D)[:, None],
                         other=0.0)
            gr = tl.load(g + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=(rm < hi)[:, None] & (rn < N)[None, :],
                         other=0.0)
            if UPCAST:
                xt, gr = xt.to(tl.float32), gr.to(tl.float32)
            acc = tl.dot(xt, gr, acc, input_precision=PRECISION)
        tl.store(out + tl.cast(e, tl.int64) * D * N + rd[:, None] * N + rn[None, :], acc.to(out.dtype.element_ty),
                 mask=(rd < D)[:, None] & (rn < N)[None, :])


_rows_mm = _tuned(_grouped_rows_mm, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), _ROW_TILES, ["N", "K"])
_weight_grad = _tuned(_grouped_weight_grad, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), _WEIGHT_TILES, ["D", "N"])


def _precision(t: Tensor) -> str | None:
    """tl.dot input precision for fp32 operands: torch's matmul precision setting (ieee at 'highest', the default,
    else tf32); None (Triton's default) for the 16-bit types, which it does not concern."""
    if t.dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _launch(kernel, tiles, device: torch.device, *args, **kwargs) -> None:
    """Launch a persistent kernel: `tiles(meta)` upper-bounds its tile count for the tile shape in `meta`."""
    if interpreting():
        kernel[(persistent_programs(device, tiles(_INTERPRETER_TILE)),)](*args, **kwargs, **_INTERPRETER_TILE)
    else:
        kernel[lambda meta: (persistent_programs(device, tiles(meta)),)](*args, **kwargs)


def _rows_product(a: Tensor, b: Tensor, starts: Tensor, transpose_b: bool) -> Tensor:
    """[M, N] = per group a[rows] @ b[g] (b[g]^T if transpose_b), rows past starts[E] zero."""
    num_groups = b.shape[0]
    k, n = (b.shape[2], b.shape[1]) if transpose_b else (b.shape[1], b.shape[2])
    stride_bk, stride_bn = (b.stride(2), b.stride(1)) if transpose_b else (b.stride(1), b.stride(2))
    out = a.new_empty(a.shape[0], n)
    m = a.shape[0]

    def tiles(meta):  # row tiles of all groups at most cdiv(M, BLOCK_M) + E + 1, times the column tiles
        return (triton.cdiv(m, meta["BLOCK_M"]) + num_groups + 1) * triton.cdiv(n, meta["BLOCK_N"])

    _launch(_rows_mm, tiles, a.device, a, b, out, starts, num_groups, n, k, a.stride(0), a.stride(1), b.stride(0),
            stride_bk, stride_bn, PRECISION=_precision(a), UPCAST=UPCAST_DOT)
    return out


def _weight_product(x: Tensor, grad: Tensor, starts: Tensor, num_groups: int) -> Tensor:
    d, n = x.shape[1], grad.shape[1]
    out = x.new_empty(num_groups, d, n)

    def tiles(meta):
        return num_groups * triton.cdiv(d, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])

    _launch(_weight_grad, tiles, x.device, x, grad, out, starts, num_groups, d, n, PRECISION=_precision(x),
            UPCAST=UPCAST_DOT)
    return out


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        x = x.contiguous()
        # [E + 2]: group g's rows start at starts[g]; the zero-filled rest runs from starts[E] to starts[E + 1] = M
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0), counts.new_full((1,), x.shape[0])]).to(torch.int32)
        ctx.save_for_backward(x, w, starts)
        return _rows_product(x, w, starts, transpose_b=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, starts = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _rows_product(grad, w, starts, transpose_b=True) if ctx.needs_input_grad[0] else None
        gw = _weight_product(x, grad, starts, w.shape[0]) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def grouped_mm_triton(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Triton implementation of `triton_ops.grouped_mm` (counts an int64 tensor on x's device)."""
    return _TritonGroupedMM.apply(x, w, counts)
