"""Permute tokens into expert-contiguous order, and the weighted inverse.

Shapes are static: `permute` returns one row per assignment, T * k, the kept ones first in slot order and the
dropped ones after them as zero rows whose `order` is -1, so that nothing waits for the device to learn how
many assignments were kept.
"""

import torch
from torch import Tensor

from triton_ops.backend import kernels_for
from triton_ops.checks import check_ids
from triton_ops.histogram import expert_histogram_reference


def permute(x: Tensor, slot_ids: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather each (token, choice) assignment's row so that rows of the same slot are contiguous.

    Assignments are ordered by slot id; within a slot, by flat assignment index (token-major), so the
    order is deterministic.

    Args:
        x: [T, d] token activations.
        slot_ids: [T, k] integer destination slot (expert) per assignment, -1 for a dropped assignment.
        num_slots: number of slots.

    Returns:
        rows: [T * k, d] permuted activations (differentiable w.r.t. x); rows past counts.sum() are zero.
        order: [T * k] int64 flat assignment index (into T * k) of each row, -1 past counts.sum().
        counts: [num_slots] int64 rows per slot.
    """
    if x.dim() != 2 or slot_ids.dim() != 2 or slot_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"permute: x must be [T, d] and slot_ids [T, k] with the same T; got x {tuple(x.shape)}, "
            f"slot_ids {tuple(slot_ids.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"permute: x must be floating point, got {x.dtype}")
    check_ids(slot_ids, num_slots, "permute", "slot_ids")
    if kernels_for(x) == "triton":
        from triton_ops.kernels.permute import permute_triton

        return permute_triton(x, slot_ids, num_slots)
    return permute_reference(x, slot_ids, num_slots)


def permute_reference(x: Tensor, slot_ids: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """torch implementation of `permute`."""
    k = slot_ids.shape[1]
    flat = slot_ids.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, num_slots), stable=True)  # dropped last
    counts, offsets = expert_histogram_reference(slot_ids, num_slots)
    order = torch.where(torch.arange(flat.numel(), device=x.device) < offsets[-1], order, -1)
    rows = x.index_select(0, order.clamp(min=0) // k)
    return zero_rows_from(rows, offsets[-1]), order, counts


def unpermute(rows: Tensor, order: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """Inverse of `permute` with a weighted combine: out[t] = sum_j weights[t, j] * rows[row of (t, j)].

    Args:
        rows: [R, d] per-assignment outputs in `permute` order.
        order: [R] int64 flat assignment index of each row, as returned by `permute`; rows with -1 are skipped.
        weights: [T, k] gate weights (differentiable), floating point; dropped assignments contribute nothing.
        num_tokens: T.

    Returns:
        [T, d] combined outputs, in rows' dtype (differentiable w.r.t. rows and weights).
    """
    if rows.dim() != 2 or order.dim() != 1 or order.shape[0] != rows.shape[0]:
        raise ValueError(
            f"unpermute: rows must be [R, d] and order [R]; got rows {tuple(rows.shape)}, order {tuple(order.shape)}"
        )
    if weights.dim() != 2 or weights.shape[0] != num_tokens:
        raise ValueError(f"unpermute: weights must be [num_tokens={num_tokens}, k], got {tuple(weights.shape)}")
    if not (rows.dtype.is_floating_point and weights.dtype.is_floating_point):
        raise ValueError(f"unpermute: rows and weights must be floating point, got {rows.dtype} and {weights.dtype}")
    check_ids(order, weights.numel(), "unpermute", "order")
    if kernels_for(rows) == "triton":
        from triton_ops.kernels.permute import unpermute_triton

        return unpermute_triton(rows, order, weights, num_tokens)
    return unpermute_reference(rows, order, weights, num_tokens)


def unpermute_reference(rows: Tensor, order: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """torch implementation of `unpermute`: skipped rows land in a spare output row that is cut off."""
    k = weights.shape[1]
    kept = order >= 0
    scaled = rows * weights.reshape(-1).index_select(0, order.clamp(min=0)).unsqueeze(1).to(rows.dtype)
    token = torch.where(kept, order // k, num_tokens)
    return rows.new_zeros(num_tokens + 1, rows.shape[1]).index_add(0, token, scaled)[:num_tokens]


def zero_rows_from(t: Tensor, start: Tensor) -> Tensor:
    """Zero rows start.. of `t` [R, ...] in place and return it (start: 0-d tensor on t's device; read on the host
    only on CPU, where that costs nothing)."""
    if t.device.type == "cpu":
        if int(start) < t.shape[0]:  # (an in-place write on an autograd output costs a gradient copy: only if needed)
            t[int(start) :] = 0
        return t
    tail = torch.arange(t.shape[0], device=t.device) >= start
    return t.masked_fill_(tail.view(-1, *([1] * (t.dim() - 1))), 0)
