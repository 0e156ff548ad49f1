"""Fused router gating: softmax, top-k, renormalisation and logsumexp in one pass over the logits, and its backward."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ops.kernels.launch import pow2


@triton.jit
def _topk_softmax_fwd(logits, probs, weights, ids, lse, T, E,
                      K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < E)[None, :]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    z = tl.load(logits + offs, mask=mask, other=-float("inf"))
    top = tl.where(row_ok, tl.max(z, axis=1), 0.0)
    ex = tl.exp(z - top[:, None])
    total = tl.where(row_ok, tl.sum(ex, axis=1), 1.0)
    p = ex / total[:, None]
    tl.store(probs + offs, p, mask=mask)
    tl.store(lse + rows, top + tl.log(total), mask=row_ok)
    rest = tl.where(mask, p, -1.0)
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=p.dtype)
    idx = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):  # the k largest, lowest expert id first among equals
        best = tl.max(rest, axis=1)
        arg = tl.min(tl.where(rest == best[:, None], cols[None, :], BLOCK_E), axis=1)
        w = tl.where(kcols[None, :] == j, best[:, None], w)
        idx = tl.where(kcols[None, :] == j, arg.to(tl.int64)[:, None], idx)
        rest = tl.where(cols[None, :] == arg[:, None], -1.0, rest)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    kmask = row_ok[:, None] & (kcols < K)[None, :]
    koffs = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(weights + koffs, w, mask=kmask)
    tl.store(ids + koffs, idx, mask=kmask)


@triton.jit
def _topk_softmax_bwd(probs, weights, ids, g_probs, g_weights, g_lse, g_logits, T, E,
                      K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < E)[None, :]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    p = tl.load(probs + offs, mask=mask, other=0.0)
    gp = tl.load(g_probs + offs, mask=mask, other=0.0)
    koffs = rows.to(tl.int64) * K
    if RENORM:  # w_j = p_j / S: dL/dp_j = (g_j - sum_i g_i w_i) / S
        chosen = tl.zeros([BLOCK_T], dtype=p.dtype)
        g_dot_w = tl.zeros([BLOCK_T], dtype=p.dtype)
        for j in tl.static_range(K):
            i = tl.load(ids + koffs + j, mask=row_ok, other=0)
            chosen += tl.sum(tl.where(cols[None, :] == i[:, None], p, 0.0), axis=1)
            g_dot_w += tl.load(g_weights + koffs + j, mask=row_ok, other=0.0) * tl.load(
                weights + koffs + j, mask=row_ok, other=0.0)
        chosen = tl.where(row_ok, chosen, 1.0)
    for j in tl.static_range(K):
        i = tl.load(ids + koffs + j, mask=row_ok, other=0)
        g = tl.load(g_weights + koffs + j, mask=row_ok, other=0.0)
        if RENORM:
            g = (g - g_dot_w) / chosen
        gp += tl.where(cols[None, :] == i[:, None], g[:, None], 0.0)
    g_l = tl.load(g_lse + rows, mask=row_ok, other=0.0)
    grad = p * (gp - tl.sum(p * gp, axis=1)[:, None] + g_l[:, None])
    tl.store(g_logits + offs, grad, mask=mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = pow2(num_experts)
    return max(1, min(64, 4096 // block_e)), block_e


class _TopkSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, k: int, renormalize: bool):
        logits = logits.contiguous()
        t, e = logits.shape
        probs = torch.empty_like(logits)
        weights = logits.new_empty(t, k)
        ids = torch.empty(t, k, dtype=torch.long, device=logits.device)
        lse = logits.new_empty(t)
        block_t, block_e = _blocks(e)
        _topk_softmax_fwd[(triton.cdiv(t, block_t),)](
            logits, probs, weights, ids, lse, t, e, K=k, RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
            BLOCK_K=pow2(k))
        ctx.save_for_backward(probs, weights, ids)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(ids)
        return probs, weights, ids, lse

    @staticmethod
    def backward(ctx, g_probs: Tensor, g_weights: Tensor, _g_ids, g_lse: Tensor):
        probs, weights, ids = ctx.saved_tensors
        t, e = probs.shape
        g_logits = torch.empty_like(probs)
        block_t, block_e = _blocks(e)
        _topk_softmax_bwd[(triton.cdiv(t, block_t),)](
            probs, weights, ids, g_probs.contiguous(), g_weights.contiguous(), g_lse.contiguous(), g_logits, t, e,
            K=ids.shape[1], RENORM=ctx.renormalize, BLOCK_T=block_t, BLOCK_E=block_e)
        return g_logits, None, None


def topk_softmax_triton(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of `triton_ops.topk_softmax` (same arguments and results)."""
    return _TopkSoftmax.apply(logits, k, renormalize)
