"""Gradient all-reduce among the replicas of replicated experts."""

import torch
import torch.distributed as dist

from lightning_smartmoe.moe.layer import MoELayer


@torch.no_grad()
def sync_replica_grads(layer: MoELayer) -> None:
    """Give every replica of an expert the sum of all its replicas' gradients (collective over the layer's
    expert-parallel group; a no-op without replicas).

    Each replica computed its expert's gradient over its share of the tokens. Every rank sums the replicas
    in ascending slot order, so all replicas stay bitwise identical.
    """
    placement, rank = layer.placement, layer.ep_rank
    if layer.ep_group is None or int(placement.num_replicas.max()) == 1:
        return
    spr = placement.slots_per_rank
    mine = layer.experts.logical_ids
    shared = [  # [peer rank] -> my slots whose expert that peer also holds, by expert id
        sorted((e, slot) for slot, e in enumerate(mine) if e >= 0 and r != rank and r in placement.ranks_of(e))
        for r in range(placement.ep)
    ]
    w1, w2 = layer.experts.w1, layer.experts.w2
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in (w1, w2)]
    width = sum(g[0].numel() for g in grads)

    def row(slot: int) -> torch.Tensor:
        return torch.cat([g[slot].reshape(-1) for g in grads])

    send = torch.cat([row(slot) for peer in shared for _, slot in peer] or [w1.new_empty(0)])
    splits = [len(peer) * width for peer in shared]  # symmetric: a peer holds the same shared experts as I do
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, splits, splits, group=layer.ep_group)
    received: dict[tuple[int, int], torch.Tensor] = {}  # (expert, peer rank) -> its gradient row
    offset = 0
    for r, peer in enumerate(shared):
        for e, _ in peer:
            received[(e, r)] = recv[offset : offset + width]
            offset += width
    for e, slot in sorted((e, slot) for slot, e in enumerate(mine) if e >= 0 and len(placement.replicas_of(e)) > 1):
        total = None
        for r in placement.ranks_of(e):  # ascending rank = ascending global slot
            part = row(slot) if r == rank else received[(e, r)]
            total = part.clone() if total is None else total + part
        offset = 0
        for g in grads:
            n = g[slot].numel()
            g[slot].copy_(total[offset : offset + n].view_as(g[slot]))
            offset += n
    for p, g in zip((w1, w2), grads):
        p.grad = g
