"""Gradient buckets start once every parameter has all of its step's gradients."""

import torch
from torch import nn

from lightning_smartmoe.grad_sync import GradientSynchronizer


def test_buckets_start_after_the_last_of_a_steps_backwards():
    """A pipeline schedule runs one backward per micro-batch: with two per step, no bucket may start after
    the first, and all have started after the second (before end_backward); finish averages by the divisor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    sync = GradientSynchronizer(divisor=2, bucket_bytes=64, backwards_per_step=2)  # 64 bytes: several buckets
    sync.add(list(model.parameters()), None)
    assert len(sync.buckets) > 1
    sync.reset()
    x = torch.randn(3, 4)
    model(x).sum().backward()
    assert sync._next == 0
    model(x).sum().backward()
    assert sync._next == len(sync.buckets)
    grads = [p.grad.clone() for p in model.parameters()]
    sync.finish()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g / 2)
    sync.remove()
