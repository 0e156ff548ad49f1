"""Permute tokens into expert-contiguous order, and the weighted inverse."""

import torch
from torch import Tensor


def permute(x: Tensor, slot_ids: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather each (token, choice) assignment's row so that rows of the same slot are contiguous.

    Assignments are ordered by slot id; within a slot, by flat assignment index (token-major), so the
    order is deterministic.

    Args:
        x: [T, d] token activations.
        slot_ids: [T, k] int64 destination slot (expert) per assignment, -1 for a dropped assignment.
        num_slots: number of slots.

    Returns:
        rows: [N, d] permuted activations, N = number of kept assignments (differentiable w.r.t. x).
        order: [N] int64 flat assignment index (into T * k) of each row.
        counts: [num_slots] int64 rows per slot.
    """
    k = slot_ids.shape[1]
    flat = slot_ids.reshape(-1)
    kept = torch.nonzero(flat >= 0).squeeze(1)
    order = kept[torch.argsort(flat[kept], stable=True)]
    counts = torch.bincount(flat[kept], minlength=num_slots)
    return x.index_select(0, order // k), order, counts


def unpermute(rows: Tensor, order: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """Inverse of `permute` with a weighted combine: out[t] = sum_j weights[t, j] * rows[row of (t, j)].

    Args:
        rows: [N, d] per-assignment outputs in `permute` order.
        order: [N] int64 flat assignment index of each row, as returned by `permute`.
        weights: [T, k] gate weights (differentiable); dropped assignments contribute nothing.
        num_tokens: T.

    Returns:
        [T, d] combined outputs, in rows' dtype.
    """
    k = weights.shape[1]
    scaled = rows * weights.reshape(-1).index_select(0, order).unsqueeze(1).to(rows.dtype)
    out = rows.new_zeros(num_tokens, rows.shape[1])
    return out.index_add(0, order // k, scaled)
