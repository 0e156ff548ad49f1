"""Gradient all-reduce among the replicas of replicated experts: a reduce-scatter, then an all-gather."""

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_smartmoe.moe.layer import MoELayer


@torch.no_grad()
def sync_replica_grads(layer: MoELayer) -> None:
    """Give every replica of an expert the sum of all its replicas' gradients (collective over the layer's
    expert-parallel group; a no-op when the placement has no replicas).

    An expert with P gradient elements and r replicas is cut into r chunks; the j-th replica (in rank
    order) sums chunk j over all replicas, in rank order, and sends the sum back to the others. Each
    replica sends 2 (r - 1) / r * P elements, and all replicas end bitwise identical. All replicated
    experts of the layer travel together in two all_to_all_single calls.
    """
    placement, rank = layer.placement, layer.ep_rank
    if layer.ep_group is None or int(placement.num_replicas.max()) == 1:
        return
    w1, w2 = layer.experts.w1, layer.experts.w2
    for p in (w1, w2):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    width = w1[0].numel() + w2[0].numel()
    mine = {e: slot for slot, e in enumerate(layer.experts.logical_ids) if e >= 0 and len(placement.replicas_of(e)) > 1}
    flat = {e: torch.cat([w1.grad[slot].reshape(-1), w2.grad[slot].reshape(-1)]) for e, slot in mine.items()}

    def chunk(e: int, holder: int) -> slice:
        """The part of expert e's gradient that `holder` reduces."""
        holders = placement.ranks_of(e)
        j, r = holders.index(holder), len(holders)
        return slice(j * width // r, (j + 1) * width // r)

    def size(s: slice) -> int:
        return s.stop - s.start

    peers = range(placement.ep)
    shared = [[e for e in sorted(mine) if p != rank and p in placement.ranks_of(e)] for p in peers]
    mine_sizes = [sum(size(chunk(e, rank)) for e in shared[p]) for p in peers]
    their_sizes = [sum(size(chunk(e, p)) for e in shared[p]) for p in peers]

    def exchange(send: list[Tensor], send_sizes: list[int], recv_sizes: list[int]) -> Tensor:
        out = w1.new_empty(sum(recv_sizes))
        inp = torch.cat(send) if send else w1.new_empty(0)
        dist.all_to_all_single(out, inp, recv_sizes, send_sizes, group=layer.ep_group)
        return out

    # Reduce-scatter: send each peer its chunk of our copy; sum our chunk over all holders in rank order.
    received = exchange([flat[e][chunk(e, p)] for p in peers for e in shared[p]], their_sizes, mine_sizes)
    parts: dict[tuple[int, int], Tensor] = {}
    offset = 0
    for p in peers:
        for e in shared[p]:
            n = size(chunk(e, rank))
            parts[(e, p)] = received[offset : offset + n]
            offset += n
    reduced = {}
    for e in mine:
        total = None
        for h in placement.ranks_of(e):
            part = flat[e][chunk(e, rank)] if h == rank else parts[(e, h)]
            total = part.clone() if total is None else total + part
        reduced[e] = total
    # All-gather: send our reduced chunk to each peer; place theirs.
    gathered = exchange([reduced[e] for p in peers for e in shared[p]], mine_sizes, their_sizes)
    offset = 0
    for p in peers:
        for e in shared[p]:
            s = chunk(e, p)
            flat[e][s] = gathered[offset : offset + size(s)]
            offset += size(s)
    for e, slot in mine.items():
        flat[e][chunk(e, rank)] = reduced[e]
        n1 = w1[0].numel()
        w1.grad[slot].copy_(flat[e][:n1].view_as(w1.grad[slot]))
        w2.grad[slot].copy_(flat[e][n1:].view_as(w2.grad[slot]))
