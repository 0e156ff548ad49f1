"""Live migration: move the experts whose slot changes, with their optimizer state, between optimizer steps."""

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_smartmoe.moe.layer import MoELayer
from lightning_smartmoe.placement.map import Placement, moves


def slot_fields(layer: MoELayer, optimizers: list[Optimizer], stepped: Callable[[Tensor], Tensor] = lambda p: p) -> list[Tensor]:
    """Every per-slot tensor of the layer's experts, [slots, ...] each: each expert parameter (w1, w2, and w3 for
    SwiGLU) and, for each, the optimizer state shaped like the tensor the optimizer steps for it (`stepped(p)`: p, or its ZeRO block's master, which
    is itself moved when it is not a view of p) (AdamW's exp_avg and exp_avg_sq; any master copy an optimizer
    keeps per element). Per-parameter scalars such as Adam's step are shared by all slots and need no move."""
    fields = []
    for p in layer.experts.parameters():
        fields.append(p.data)
        held = stepped(p)
        if held.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
            fields.append(held)
        for opt in optimizers:
            fields.extend(v for v in opt.state.get(held, {}).values() if isinstance(v, Tensor) and v.shape == held.shape)
    return fields


def _pack(fields: list[Tensor], slot: int, dtype: torch.dtype) -> Tensor:
    return torch.cat([f[slot].reshape(-1).to(dtype) for f in fields])


def _unpack(fields: list[Tensor], slot: int, flat: Tensor) -> None:
    offset = 0
    for f in fields:
        n = f[slot].numel()
        f[slot].copy_(flat[offset : offset + n].view_as(f[slot]))
        offset += n


@torch.no_grad()
def migrate(layer: MoELayer, new: Placement, optimizers: list[Optimizer], stepped: Callable[[Tensor], Tensor] = lambda p: p) -> int:
    """Switch `layer` to placement `new` (collective over its expert-parallel group; every rank passes the same
    `new`). Only slots whose expert changes are written; remote copies travel in one all_to_all_single.

    Returns the number of elements this rank sent to other ranks.
    """
    old, rank, spr = layer.placement, layer.ep_rank, new.slots_per_rank
    plan = moves(old, new)
    fields = slot_fields(layer, optimizers, stepped)
    width = sum(f[0].numel() for f in fields)
    dtype = functools.reduce(torch.promote_types, [f.dtype for f in fields])  # bf16 weights travel exactly in fp32
    outgoing = {m: _pack(fields, m.src - rank * spr, dtype) for m in plan if m.src_rank == rank}  # read before any write
    incoming: dict = {m: outgoing[m] for m in plan if m.local and m.dst_rank == rank}
    remote = [m for m in plan if not m.local]
    sent = 0
    if remote:
        ep = old.ep
        sends = [[m for m in remote if m.src_rank == rank and m.dst_rank == r] for r in range(ep)]
        recvs = [[m for m in remote if m.dst_rank == rank and m.src_rank == r] for r in range(ep)]
        empty = fields[0].new_empty(0, dtype=dtype)
        send_buf = torch.cat([outgoing[m] for batch in sends for m in batch] or [empty])
        recv_buf = empty.new_empty(sum(len(b) for b in recvs) * width)
        dist.all_to_all_single(
            recv_buf, send_buf, [len(b) * width for b in recvs], [len(b) * width for b in sends], group=layer.ep_group
        )
        sent = send_buf.numel()
        for i, m in enumerate(m for batch in recvs for m in batch):
            incoming[m] = recv_buf[i * width : (i + 1) * width]
    for m, flat in incoming.items():
        _unpack(fields, m.dst - rank * spr, flat)
    layer.relabel(new)
    return sent
