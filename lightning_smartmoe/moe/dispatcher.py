"""Token dispatcher: moves each (token, choice) assignment to the rank holding its expert slot and back.

Global slot g lives on rank g // slots_per_rank of the expert-parallel group, in local slot
g % slots_per_rank. Without a group every slot is local and dispatch is a permutation that never waits for
the device; with one, the all-to-all needs the split sizes on the host (the one sync per dispatch).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from triton_ops import permute, unpermute


class _AllToAll(torch.autograd.Function):
    """[sum(send), d] rows, send[i] of them to rank i of `group` -> [sum(recv), d], recv[i] from rank i; backward
    sends the gradients back the same way. A plain c10d call: torch's functional all-to-all with autograd costs
    0.2-1 ms more per call on CPU in its Python wrappers (docs/measurements.md)."""

    @staticmethod
    def forward(ctx, rows: Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        return _exchange(rows, recv, send, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _exchange(grad, ctx.send, ctx.recv, ctx.group), None, None, None


def _exchange(rows: Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> Tensor:
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    return out


@dataclass
class DispatchState:
    """What `combine` needs to undo a `dispatch`."""

    order: Tensor  # [R] flat assignment index of each locally permuted row (-1: a dropped assignment's row)
    num_tokens: int
    send_splits: list[int] | None = None  # rows sent to each EP rank
    recv_splits: list[int] | None = None  # rows received from each EP rank
    to_slot_major: Tensor | None = None  # [M] received row feeding each slot-major row


class TokenDispatcher:
    """Dispatch and combine over an expert-parallel group of `ep` ranks (`ep_group=None`: one rank)."""

    def __init__(self, slots_per_rank: int, ep_group: dist.ProcessGroup | None = None) -> None:
        self.slots_per_rank = slots_per_rank
        self.ep_group = ep_group
        self.ep = 1 if ep_group is None else dist.get_world_size(ep_group)

    @property
    def num_slots(self) -> int:
        """Slots in the whole expert-parallel group."""
        return self.ep * self.slots_per_rank

    def dispatch(self, x: Tensor, slot_ids: Tensor) -> tuple[Tensor, Tensor, DispatchState]:
        """Send assignments to their slots.

        Args:
            x: [T, d] tokens of this rank.
            slot_ids: [T, k] global slot per assignment, -1 = dropped.

        Returns:
            rows: [M, d] tokens for this rank's slots, grouped by local slot (differentiable); without a group
                M = T * k, and the rows past counts.sum() (dropped assignments) are zero.
            counts: [slots_per_rank] int64 rows per local slot, on x's device.
            state: for `combine`.
        """
        rows, order, counts = permute(x, slot_ids, self.num_slots)
        state = DispatchState(order, x.shape[0])
        if self.ep_group is None:
            return rows, counts, state
        # counts[i * S + s]: rows this rank sends to slot s of rank i; exchange them first.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)
        recv_counts = recv_counts.view(self.ep, self.slots_per_rank)  # [source rank, local slot]
        # rows to and from each rank, on the host in one read (the one sync)
        state.send_splits, state.recv_splits = torch.stack(
            [counts.view(self.ep, self.slots_per_rank).sum(1), recv_counts.sum(1)]
        ).tolist()
        sent = sum(state.send_splits)  # the kept rows; the dropped ones after them stay here
        state.order = order[:sent]
        received = _AllToAll.apply(rows[:sent], state.recv_splits, state.send_splits, self.ep_group)
        # Received rows are ordered (source rank, local slot); the experts want (local slot, source rank).
        block = torch.arange(recv_counts.numel(), device=x.device).repeat_interleave(
            recv_counts.reshape(-1), output_size=sum(state.recv_splits)
        )
        slot_major_key = (block % self.slots_per_rank) * self.ep + block // self.slots_per_rank
        state.to_slot_major = torch.argsort(slot_major_key, stable=True)
        return received.index_select(0, state.to_slot_major), recv_counts.sum(0), state

    def combine(self, rows: Tensor, weights: Tensor, state: DispatchState) -> Tensor:
        """Return expert outputs to their tokens and sum them with the gate weights.

        Args:
            rows: [M, d] expert outputs in `dispatch`'s output order.
            weights: [T, k] gate weights.
            state: from `dispatch`.

        Returns:
            [T, d].
        """
        if self.ep_group is not None:
            back = torch.empty_like(state.to_slot_major)
            back[state.to_slot_major] = torch.arange(back.numel(), device=back.device)
            rows = _AllToAll.apply(rows.index_select(0, back), state.send_splits, state.recv_splits, self.ep_group)
        return unpermute(rows, state.order, weights, state.num_tokens)
