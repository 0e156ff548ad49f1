"""Bucketed gradient averaging, launched during backward as buckets fill up."""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup | None  # None: nothing to reduce, only scale
    ready: int = 0
    buffer: torch.Tensor | None = None
    work: dist.Work | None = None


@dataclass
class GradientSynchronizer:
    """Averages gradients over data-parallel replicas: every gradient is summed over its group and divided
    by `divisor` (the data-parallel size, so that expert gradients, already summed over the expert-parallel
    group by the all-to-all backward, end up averaged over all data-parallel ranks).

    Parameters are packed into buckets of about `bucket_bytes` in reverse registration order (roughly the
    order backward produces them). A bucket's all-reduce starts as soon as all its gradients are
    accumulated; buckets start in index order on every rank, so collectives match across ranks.
    """

    divisor: int
    bucket_bytes: int = 25 * 2**20
    enabled: bool = True
    buckets: list[_Bucket] = field(default_factory=list)
    _next: int = 0

    def add(self, params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
        """Register parameters averaged over `group` (None or a group of one: scaled only)."""
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        first = len(self.buckets)
        bucket: list[nn.Parameter] = []
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            if bucket and (size + p.numel() * p.element_size() > self.bucket_bytes or p.dtype != bucket[0].dtype):
                self.buckets.append(_Bucket(bucket, group))
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel() * p.element_size()
        if bucket:
            self.buckets.append(_Bucket(bucket, group))
        for index in range(first, len(self.buckets)):
            for p in self.buckets[index].params:
                p.register_post_accumulate_grad_hook(lambda _p, i=index: self._on_grad_ready(i))

    def _on_grad_ready(self, index: int) -> None:
        if not self.enabled:
            return
        bucket = self.buckets[index]
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.buffer = torch.cat([g.reshape(-1) for g in grads]).div_(self.divisor)
        if bucket.group is not None:
            bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)

    def finish(self) -> None:
        """Launch what backward did not (unused parameters count as zero), wait, and write the averages back."""
        if not self.enabled:
            return
        for bucket in self.buckets[self._next :]:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            offset = 0
            for p in bucket.params:
                n = p.numel()
                p.grad = bucket.buffer[offset : offset + n].view_as(p)
                offset += n
            bucket.ready, bucket.buffer, bucket.work = 0, None, None
        self._next = 0
