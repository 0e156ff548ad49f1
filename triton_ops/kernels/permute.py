"""Permute and weighted unpermute as gathers: every output row or token is written by one program, so there are
no atomics and results do not depend on scheduling.

permute: per block of assignments, a histogram of its slots; an exclusive scan over blocks and slots (torch, on
device) gives each block's first row per slot; then each assignment's row = that + its rank among the block's
earlier assignments to the same slot. Dropped assignments count as slot `num_slots`, so they land after all kept
ones. unpermute gathers each token's k rows through the inverse map and sums them with the gate weights.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ops.kernels.launch import accumulator, pow2

ASSIGN_BLOCK = 64  # assignments per program in the position kernels (a [64, 64] comparison per program)


@triton.jit
def _block_histogram(slot_ids, block_counts, n, NUM_SLOTS, BLOCK: tl.constexpr, BINS: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(slot_ids + offs, mask=offs < n, other=-1).to(tl.int32)
    b = tl.where(s >= 0, s, NUM_SLOTS)  # dropped: bin NUM_SLOTS
    hist = tl.histogram(b, BINS, mask=offs < n)
    bins = tl.arange(0, BINS)
    tl.store(block_counts + pid * (NUM_SLOTS + 1) + bins, hist, mask=bins <= NUM_SLOTS)


@triton.jit
def _assign_rows(slot_ids, block_start, order, position, n, NUM_SLOTS, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid * BLOCK + lane
    valid = offs < n
    s = tl.load(slot_ids + offs, mask=valid, other=-1).to(tl.int32)
    b = tl.where(s >= 0, s, NUM_SLOTS)
    earlier = (b[:, None] == b[None, :]) & (lane[None, :] < lane[:, None]) & valid[None, :]
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    row = tl.load(block_start + pid * (NUM_SLOTS + 1) + b, mask=valid, other=0).to(tl.int64) + rank
    kept = s >= 0
    tl.store(order + row, tl.where(kept, offs.to(tl.int64), -1), mask=valid)
    tl.store(position + offs, tl.where(kept, row, -1), mask=valid)


@triton.jit
def _gather_rows(src, order, weights, dst, dot_with, g_weights, R, D, K: tl.constexpr, WEIGHTED: tl.constexpr,
                 DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # dst[r] = src[order[r] // K] (times weights[order[r]] if WEIGHTED), zero where order[r] < 0;
    # DOT: g_weights[order[r]] = <dot_with[r], src[order[r] // K]>
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    o = tl.load(order + r, mask=r < R, other=-1)
    kept = o >= 0
    token = tl.where(kept, o // K, 0)
    if WEIGHTED:
        w = tl.load(weights + o, mask=kept, other=0.0).to(ACC)
    if DOT:
        dot = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = (d < D)[None, :]
        v = tl.load(src + token[:, None] * D + d[None, :], mask=kept[:, None] & dm, other=0.0).to(ACC)
        if DOT:
            other = tl.load(dot_with + r.to(tl.int64)[:, None] * D + d[None, :], mask=kept[:, None] & dm, other=0.0)
            dot += tl.sum(v * other.to(ACC), axis=1)
        if WEIGHTED:
            v = v * w[:, None]
        tl.store(dst + r.to(tl.int64)[:, None] * D + d[None, :], v.to(dst.dtype.element_ty), mask=(r < R)[:, None] & dm)
    if DOT:
        tl.store(g_weights + o, dot.to(g_weights.dtype.element_ty), mask=kept)


@triton.jit
def _combine_rows(src, position, weights, dst, T, D, K: tl.constexpr, WEIGHTED: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dst[t] = sum_j weights[t, j] * src[position[t, j]] over the j with position >= 0
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < T
    dm = (d < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
    for j in tl.static_range(K):
        p = tl.load(position + t.to(tl.int64) * K + j, mask=tm, other=-1)
        v = tl.load(src + p[:, None] * D + d[None, :], mask=(p >= 0)[:, None] & dm, other=0.0).to(ACC)
        if WEIGHTED:
            v = v * tl.load(weights + t.to(tl.int64) * K + j, mask=tm & (p >= 0), other=0.0).to(ACC)[:, None]
        acc += v
    tl.store(dst + t.to(tl.int64)[:, None] * D + d[None, :], acc.to(dst.dtype.element_ty), mask=tm[:, None] & dm)


def _gather(src: Tensor, order: Tensor, k: int, rows: int, weights: Tensor | None = None,
            dot_with: Tensor | None = None, g_weights: Tensor | None = None) -> Tensor:
    d = src.shape[1]
    dst = src.new_empty(rows, d)
    block_d = min(pow2(d, 16), 128)
    _gather_rows[(triton.cdiv(rows, 32),)](
        src, order, weights if weights is not None else src, dst, dot_with if dot_with is not None else src,
        g_weights if g_weights is not None else src, rows, d, K=k, WEIGHTED=weights is not None,
        DOT=dot_with is not None, ACC=accumulator(src), BLOCK_R=32, BLOCK_D=block_d)
    return dst


def _combine(src: Tensor, position: Tensor, tokens: int, k: int, weights: Tensor | None = None) -> Tensor:
    d = src.shape[1]
    dst = src.new_empty(tokens, d)
    block_d = min(pow2(d, 16), 128)
    _combine_rows[(triton.cdiv(tokens, 32), triton.cdiv(d, block_d))](
        src, position, weights if weights is not None else src, dst, tokens, d, K=k, WEIGHTED=weights is not None,
        ACC=accumulator(src), BLOCK_T=32, BLOCK_D=block_d)
    return dst


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, slot_ids: Tensor, num_slots: int):
        x = x.contiguous()
        t, k = slot_ids.shape
        n = t * k
        flat = slot_ids.reshape(-1).contiguous()
        blocks = triton.cdiv(n, ASSIGN_BLOCK)
        block_counts = torch.empty(blocks, num_slots + 1, dtype=torch.int32, device=x.device)
        order = torch.empty(n, dtype=torch.long, device=x.device)
        position = torch.empty(n, dtype=torch.long, device=x.device)
        if n:
            _block_histogram[(blocks,)](flat, block_counts, n, num_slots, BLOCK=ASSIGN_BLOCK, BINS=pow2(num_slots + 1))
        per_slot = block_counts.sum(0, dtype=torch.long)  # [slots + 1], the last: dropped
        slot_start = per_slot.cumsum(0) - per_slot
        block_start = (block_counts.cumsum(0, dtype=torch.long) - block_counts + slot_start).to(torch.int32)
        if n:
            _assign_rows[(blocks,)](flat, block_start, order, position, n, num_slots, BLOCK=ASSIGN_BLOCK)
        rows = _gather(x, order, k, n)
        ctx.save_for_backward(position)
        ctx.shape = t, k
        ctx.mark_non_differentiable(order, per_slot)
        return rows, order, per_slot[:num_slots]

    @staticmethod
    def backward(ctx, g_rows: Tensor, _g_order, _g_counts):
        (position,) = ctx.saved_tensors
        t, k = ctx.shape
        return _combine(g_rows.contiguous(), position, t, k), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, order: Tensor, weights: Tensor, num_tokens: int):
        rows, order, weights = rows.contiguous(), order.contiguous(), weights.contiguous()
        k = weights.shape[1]
        n = num_tokens * k
        position = torch.full((n + 1,), -1, dtype=torch.long, device=rows.device)  # [n]: spare for order -1
        position.scatter_(0, torch.where(order >= 0, order, n), torch.arange(order.numel(), device=rows.device))
        position = position[:n]
        ctx.save_for_backward(rows, order, weights)
        ctx.num_tokens = num_tokens
        return _combine(rows, position, num_tokens, k, weights)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        rows, order, weights = ctx.saved_tensors
        k = weights.shape[1]
        g_weights = torch.zeros(weights.numel(), dtype=torch.promote_types(weights.dtype, torch.float32),
                                device=weights.device)
        g_rows = _gather(g_out.contiguous(), order, k, rows.shape[0], weights, dot_with=rows, g_weights=g_weights)
        return g_rows, None, g_weights.view_as(weights).to(weights.dtype), None


def permute_triton(x: Tensor, slot_ids: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton implementation of `triton_ops.permute` (same arguments and results)."""
    return _Permute.apply(x, slot_ids, num_slots)


def unpermute_triton(rows: Tensor, order: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """Triton implementation of `triton_ops.unpermute` (same arguments and results)."""
    return _Unpermute.apply(rows, order, weights, num_tokens)
