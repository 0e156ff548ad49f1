"""Gradient sum among the replicas of replicated experts: a reduce-scatter, then an all-gather, point to point
between the replicas, reading and writing the gradients in place; blocking, or started during backward."""

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_smartmoe.moe.layer import MoELayer

_PIECES_PER_PAIR = 1 << 12  # message tags: (layer, phase) * this + message number between a pair of ranks


class ReplicaExchange:
    """Give every replica of an expert of `layer` the sum of all its replicas' gradients (collective over the
    ranks of the layer's expert-parallel group; nothing to do when its placement has no replicas).

    Each of the expert's gradient tensors (w1 [d, h], w2 [h, d] and w3 [d, h] of its slot), P elements in all, is cut into
    r chunks for its r replicas. Phase 1 (reduce-scatter): the j-th replica (in rank order) receives chunk j from
    the others. `advance` waits for it, sums chunk j over all replicas in rank order, and starts phase 2
    (all-gather): the sum goes back to the others, straight into their gradient tensors. `wait` ends it. Each
    replica sends 2 (r - 1) / r * P elements (`sent`), and all replicas end bitwise identical. The gradients
    must not change while the exchange runs.

    `group`: the ranks of the layer's `ep_group` (default: that group; a separate communicator lets the
    exchange run beside the layer's token all-to-alls). `params`: the tensors whose `.grad` are summed, stacks
    [slots, ...] like the expert parameters (default: those; under ZeRO their blocks' masters, which every rank of
    an expert-parallel group holds for the same block).
    """

    def __init__(self, layer: MoELayer, group: dist.ProcessGroup | None = None, params: list[Tensor] | None = None) -> None:
        placement, self.rank = layer.placement, layer.ep_rank
        self.group = group if group is not None else layer.ep_group
        self.tag = 2 * (layer.index or 0) * _PIECES_PER_PAIR
        self.pieces: list[tuple[tuple[int, ...], int, list[Tensor]]] = []  # (holders, my index, r chunks)
        self.sent, self.works = 0, []
        self.phase = 0 if self.group is None or int(placement.num_replicas.max()) == 1 else 1
        if not self.phase:
            return
        params = params if params is not None else list(layer.experts.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for slot, e in sorted(enumerate(layer.experts.logical_ids), key=lambda se: se[1]):
            holders = placement.ranks_of(e) if e >= 0 else ()
            if len(holders) > 1:
                for grad in (p.grad[slot].view(-1) for p in params):
                    r, n = len(holders), grad.numel()
                    chunks = [grad[i * n // r : (i + 1) * n // r] for i in range(r)]
                    self.pieces.append((holders, holders.index(self.rank), chunks))
        self.received = params[0].grad.new_empty(sum(c[j].numel() * (len(h) - 1) for h, j, c in self.pieces))
        sends, recvs, offset = [], [], 0
        for holders, j, chunks in self.pieces:
            for i, h in enumerate(holders):
                if h != self.rank:
                    sends.append((h, chunks[i]))
                    recvs.append((h, self.received[offset : offset + chunks[j].numel()]))
                    offset += chunks[j].numel()
        self._start(sends, recvs)

    def _start(self, sends: list[tuple[int, Tensor]], recvs: list[tuple[int, Tensor]]) -> None:
        """Post the (peer in group, contiguous tensor) messages; the k-th to a peer matches its k-th receive."""
        ops, count = [], {}
        for op, pairs in ((dist.isend, sends), (dist.irecv, recvs)):
            for peer, tensor in pairs:
                k = count[(op, peer)] = count.get((op, peer), -1) + 1
                if k >= _PIECES_PER_PAIR:
                    raise ValueError(f"replica exchange: more than {_PIECES_PER_PAIR} gradient pieces between two ranks")
                tag = self.tag + (self.phase - 1) * _PIECES_PER_PAIR + k
                ops.append(dist.P2POp(op, tensor, group=self.group, group_peer=peer, tag=tag))
        self.sent += sum(t.numel() for _, t in sends)
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def _finish_phase(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []

    def advance(self) -> None:
        """End phase 1, sum, start phase 2 (nothing once phase 2 has started)."""
        if self.phase != 1:
            return
        self._finish_phase()
        offset, sends, recvs = 0, [], []
        for holders, j, chunks in self.pieces:
            parts = []
            for h in holders:
                if h == self.rank:
                    parts.append(chunks[j])
                else:
                    parts.append(self.received[offset : offset + chunks[j].numel()])
                    offset += chunks[j].numel()
            # rank order; a + b == b + a exactly, so our chunk may take the sum of the first two in place
            total = chunks[j].add_(parts[1 - j]) if j < 2 else parts[0] + parts[1]
            for part in parts[2:]:
                total.add_(part)
            if j >= 2:
                chunks[j].copy_(total)
            sends += [(h, chunks[j]) for h in holders if h != self.rank]
            recvs += [(h, chunks[i]) for i, h in enumerate(holders) if h != self.rank]
        self.phase = 2
        self._start(sends, recvs)

    def wait(self) -> None:
        """Finish the exchange."""
        self.advance()
        self._finish_phase()
        self.phase = 0


def sync_replica_grads(layer: MoELayer, group: dist.ProcessGroup | None = None, params: list[Tensor] | None = None) -> int:
    """Sum the replicas' gradients of `layer` now (ReplicaExchange, blocking). Returns the elements sent."""
    with torch.no_grad():
        exchange = ReplicaExchange(layer, group, params)
        exchange.wait()
    return exchange.sent


class OverlappedReplicaSync:
    """Starts each layer's ReplicaExchange in backward, as soon as its expert gradients are complete, so that
    it runs under the backward of the layers before it: when a layer's exchange starts, the exchanges already
    running move on by one phase (their reduce-scatter has had a layer's backward to finish). `finish` ends
    them all. Gradients are summed in place, so only the last backward before an optimizer step may start
    them: `enabled` is off for the others (gradient accumulation), and a step with several backwards (a
    pipeline schedule's micro-batches) starts a layer once each of its parameters got `backwards_per_step`
    gradients. Each rank starts the exchanges in the same order, backward's layer order, on `group`.
    """

    def __init__(self, layers: list[MoELayer], group: dist.ProcessGroup, backwards_per_step: int = 1) -> None:
        self.layers, self.group, self.backwards_per_step = layers, group, backwards_per_step
        self.enabled = True
        self.running: list[ReplicaExchange] = []
        self._ready = [0] * len(layers)
        self._needed = [len(list(layer.experts.parameters())) * backwards_per_step for layer in layers]
        self._hooks: list[RemovableHandle] = []
        for i, layer in enumerate(layers):
            for p in layer.experts.parameters():
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._on_grad_ready(i)))

    def _on_grad_ready(self, index: int) -> None:
        if not self.enabled:
            return
        self._ready[index] += 1
        if self._ready[index] != self._needed[index]:
            return
        with torch.no_grad():
            for exchange in self.running:
                exchange.advance()
            self.running.append(ReplicaExchange(self.layers[index], self.group))

    def finish(self) -> None:
        """End every exchange; start (and end) those of layers whose gradients did not complete here."""
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                if self._ready[i] < self._needed[i]:
                    self.running.append(ReplicaExchange(layer, self.group))
            for exchange in self.running:
                exchange.wait()
        self.running = []
        self.reset()

    def reset(self) -> None:
        """Forget the counts of a backward (call before each one that is to start exchanges)."""
        if self.running:
            raise RuntimeError("replica gradient exchanges are still running; call finish() first")
        self._ready = [0] * len(self.layers)

    def remove(self) -> None:
        """Detach the backward hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
