"""Bucketed gradient averaging, launched during backward as buckets fill up."""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_smartmoe.zero import Shard, reduce_scatter_single


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup | None  # None: nothing to reduce, only scale
    shards: list[Shard] | None = None  # ZeRO stage 2: reduce-scatter these parameters' blocks to their owners
    ready: int = 0
    buffer: torch.Tensor | None = None  # the gradients, then one 0/1 flag per parameter: "has a gradient"
    work: dist.Work | None = None
    received: torch.Tensor | None = None  # stage 2: this rank's blocks summed over the step's backwards, and flags


@dataclass
class GradientSynchronizer:
    """Averages gradients over data-parallel replicas: every gradient is summed over its group and divided
    by `divisor` (the data-parallel size, so that expert gradients, already summed over the expert-parallel
    group by the all-to-all backward, end up averaged over all data-parallel ranks).

    Parameters are packed into buckets of about `bucket_bytes` in reverse registration order (roughly the
    order backward produces them). A bucket's all-reduce starts as soon as all its gradients are
    accumulated, and `end_backward` starts the rest (parameters this rank did not use), so every backward
    starts every bucket once, in index order, on every rank. The groups must be used by nothing else while
    backward runs (the all-to-all of the MoE dispatch must not interleave with these all-reduces in
    different orders on different ranks). A parameter without a gradient on every rank keeps none, as in a
    single process. Several backwards per step (manual optimization) are fine: gradients keep
    accumulating in .grad and the last backward's all-reduce carries their sum. A pipeline schedule runs
    `backwards_per_step` backwards (one per micro-batch) between `reset` and `end_backward`: a bucket starts
    once each of its parameters has accumulated that many gradients.

    Parameters given with their ZeRO `shards` (stage 2) are reduce-scattered instead: each rank receives only
    the average of its own block of each gradient, the full gradients are freed as soon as their bucket is sent,
    and `finish` hands the blocks to the masters' `.grad`.
    """

    divisor: int
    bucket_bytes: int = 25 * 2**20
    backwards_per_step: int = 1
    enabled: bool = True
    buckets: list[_Bucket] = field(default_factory=list)
    _next: int = 0
    _hooks: list[RemovableHandle] = field(default_factory=list)

    def add(self, params: list[nn.Parameter], group: dist.ProcessGroup | None, shards: dict[int, Shard] | None = None) -> None:
        """Register parameters averaged over `group` (None or a group of one: scaled only); those in `shards`
        are reduce-scattered (ZeRO stage 2), in buckets of their own."""
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        shards = shards or {}
        first = len(self.buckets)
        for cut in (False, True):
            bucket: list[nn.Parameter] = []
            size = 0
            for p in reversed([p for p in params if p.requires_grad and (id(p) in shards) == cut]):
                if bucket and (size + p.numel() * p.element_size() > self.bucket_bytes or p.dtype != bucket[0].dtype):
                    self.buckets.append(_Bucket(bucket, group, [shards[id(q)] for q in bucket] if cut else None))
                    bucket, size = [], 0
                bucket.append(p)
                size += p.numel() * p.element_size()
            if bucket:
                self.buckets.append(_Bucket(bucket, group, [shards[id(q)] for q in bucket] if cut else None))
        for index in range(first, len(self.buckets)):
            for p in self.buckets[index].params:
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=index: self._on_grad_ready(i)))

    def _on_grad_ready(self, index: int) -> None:
        if not self.enabled:
            return
        bucket = self.buckets[index]
        bucket.ready += 1
        full = self.backwards_per_step
        while self._next < len(self.buckets) and self.buckets[self._next].ready == full * len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.group is None:
            return  # nothing to reduce (a group of one): `finish` scales in place
        if bucket.shards is not None:
            self._launch_reduce_scatter(bucket)
            return
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket.params]
        parts.append(torch.tensor([float(p.grad is not None) for p in bucket.params], dtype=parts[0].dtype, device=parts[0].device))
        bucket.buffer = torch.cat(parts)
        bucket.buffer[: -len(bucket.params)].div_(self.divisor)
        bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)

    def _launch_reduce_scatter(self, bucket: _Bucket) -> None:
        """Lay the gradients out rank-major (rank q's blocks of every parameter, zero-padded, then the flags), so
        that one reduce-scatter gives each rank the sum of its blocks; then free the full gradients."""
        shards, k = bucket.shards, len(bucket.params)
        width = sum(s.padded_numel for s in shards)
        n = shards[0].n
        buffer = torch.empty(n, width + k, dtype=shards[0].master.dtype, device=bucket.params[0].device)
        for q in range(n):
            offset = 0
            for s in shards:
                s.pack(s.param.grad, buffer[q, offset : offset + s.padded_numel], q)
                offset += s.padded_numel
            buffer[q, width:] = torch.tensor([float(p.grad is not None) for p in bucket.params])
        buffer[:, :width].div_(self.divisor)
        out = buffer.new_empty(width + k)
        bucket.buffer = out
        bucket.work = reduce_scatter_single(out, buffer.view(-1), group=bucket.group, async_op=True)
        for p in bucket.params:
            p.grad = None

    def _fold_received(self, bucket: _Bucket) -> None:
        """Add a finished reduce-scatter into the step's running sum (several backwards per step)."""
        bucket.work.wait()
        bucket.received = bucket.buffer if bucket.received is None else bucket.received.add_(bucket.buffer)
        bucket.buffer = bucket.work = None

    def end_backward(self) -> None:
        """Start the buckets this backward did not complete. Call after every backward."""
        if self.enabled:
            for bucket in self.buckets[self._next :]:
                self._launch(bucket)
            self._next = len(self.buckets)

    def reset(self) -> None:
        """Forget what a previous backward launched (its gradients stay accumulated in .grad, so the next
        backward's buckets carry both). Call before every backward."""
        for bucket in self.buckets:
            if bucket.work is not None and bucket.shards is not None:
                self._fold_received(bucket)  # its gradients are gone from .grad: keep the sum
            elif bucket.work is not None:
                bucket.work.wait()
            bucket.ready, bucket.buffer, bucket.work = 0, None, None
        self._next = 0

    def finish(self) -> None:
        """Wait for the last backward's all-reduces and write the averages back."""
        if not self.enabled:
            return
        self.end_backward()
        for bucket in self.buckets:
            if bucket.shards is not None:
                if bucket.work is not None:
                    self._fold_received(bucket)
                self._give_blocks(bucket)
                continue
            if bucket.group is None:
                grads = [p.grad for p in bucket.params if p.grad is not None]
                if grads:
                    torch._foreach_div_(grads, self.divisor)
                continue
            bucket.work.wait()
            n = len(bucket.params)
            grads, has_grad = bucket.buffer[:-n], bucket.buffer[-n:].tolist()
            offset = 0
            for p, present in zip(bucket.params, has_grad):
                p.grad = grads[offset : offset + p.numel()].view_as(p) if present else None
                offset += p.numel()
        self.reset()

    @staticmethod
    def _give_blocks(bucket: _Bucket) -> None:
        """Stage 2: each master's gradient is its averaged block (None where no rank had a gradient)."""
        received, offset = bucket.received, 0
        has_grad = received[-len(bucket.params) :].tolist()
        for s, present in zip(bucket.shards, has_grad):
            block = s.unpack(received[offset : offset + s.padded_numel], s.rank)
            s.master.grad = block.contiguous() if present else None
            offset += s.padded_numel
        bucket.received = None

    def remove(self) -> None:
        """Detach the backward hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
