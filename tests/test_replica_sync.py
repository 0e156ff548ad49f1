"""Replica gradient sync: every replica ends with the rank-ordered sum of its replicas' gradients, bitwise equal
across replicas; unreplicated slots are untouched; each replica sends 2 (r - 1) / r of the expert's gradient."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.placement import EMPTY, Placement
from lightning_smartmoe.placement.replica_sync import OverlappedReplicaSync, sync_replica_grads

D, H = 6, 5  # odd sizes: the chunks of w1 [d, h] and w2 [h, d] (30 elements each) are uneven for r = 4
# 4 ranks x 4 slots over 8 experts: expert 0 on every rank (r = 4), 1 on three (r = 3), 2 on two, 3-7 once
TABLE = (0, 1, 2, 3,  0, 1, 4, 5,  0, 2, 6, EMPTY,  0, 1, 7, EMPTY)


def local_grads(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, D, H, generator=gen), torch.randn(4, H, D, generator=gen)


def _sync() -> dict:
    rank = dist.get_rank()
    layer = MoELayer(D, H, MoEConfig(num_experts=8, top_k=1))
    group = dist.new_group(list(range(4)))
    layer.distribute(group, group, Placement.contiguous(8, 4, extra_slots=2))  # then adopt the replicated table
    placement = Placement(8, 4, TABLE)
    layer.relabel(placement)
    layer.experts.w1.grad, layer.experts.w2.grad = local_grads(rank)
    sent = sync_replica_grads(layer)
    return {"ids": layer.experts.logical_ids, "w1": layer.experts.w1.grad, "w2": layer.experts.w2.grad, "sent": sent}


@pytest.mark.timeout(120)
def test_replicas_get_the_rank_ordered_sum():
    out = run_distributed(4, _sync)
    placement = Placement(8, 4, TABLE)
    spr = placement.slots_per_rank
    grads = [local_grads(r) for r in range(4)]
    for rank, result in enumerate(out):
        expected_sent = 0
        for slot, e in enumerate(result["ids"]):
            for k, name in enumerate(("w1", "w2")):
                got = result[name][slot]
                if e == EMPTY or len(placement.ranks_of(e)) == 1:
                    assert torch.equal(got, grads[rank][k][slot])  # untouched
                    continue
                holders = placement.ranks_of(e)
                copies = [grads[h][k][placement.slot_expert[h * spr : (h + 1) * spr].index(e)] for h in holders]
                total = copies[0].clone()
                for c in copies[1:]:
                    total += c
                assert torch.equal(got, total), (rank, e, name)
                r, n = len(holders), got.numel()
                j = holders.index(rank)
                mine = (j + 1) * n // r - j * n // r
                expected_sent += (n - mine) + (r - 1) * mine  # reduce-scatter, then all-gather
        assert result["sent"] == expected_sent


def _sync_without_replicas() -> int:
    layer = MoELayer(D, H, MoEConfig(num_experts=4, top_k=1))
    group = dist.new_group([0, 1])
    layer.distribute(group, group, Placement.contiguous(4, 2, extra_slots=1))
    layer.experts.w1.grad = torch.ones_like(layer.experts.w1)
    return sync_replica_grads(layer)


@pytest.mark.timeout(120)
def test_no_replicas_sends_nothing():
    assert run_distributed(2, _sync_without_replicas) == [0, 0]


def _overlapped_vs_blocking() -> dict:
    torch.manual_seed(0)
    layers = [MoELayer(D, H, MoEConfig(num_experts=2, top_k=1)) for _ in range(2)]
    group = dist.new_group([0, 1])
    for i, layer in enumerate(layers):
        layer.index = i
        layer.distribute(group, group, Placement.contiguous(2, 2, extra_slots=1))
        layer.relabel(Placement(2, 2, (0, 1, 1, 0)))  # both experts on both ranks
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(dist.get_rank()))

    def backward() -> None:
        h = x
        for layer in layers:
            h = h + layer(h)[0]
        h.square().sum().backward()

    sync = OverlappedReplicaSync(layers, dist.new_group([0, 1]))
    backward()
    phases = [(exchange.tag, exchange.phase) for exchange in sync.running]
    sync.finish()
    overlapped = [g.clone() for layer in layers for g in (layer.experts.w1.grad, layer.experts.w2.grad)]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    sync.enabled = False
    backward()
    for layer in layers:
        sync_replica_grads(layer)
    blocking = [g for layer in layers for g in (layer.experts.w1.grad, layer.experts.w2.grad)]
    sync.remove()
    return {"phases": phases, "same": all(torch.equal(a, b) for a, b in zip(overlapped, blocking)),
            "grads": overlapped}


@pytest.mark.timeout(120)
def test_overlapped_exchange_starts_in_backward_and_matches_blocking():
    """The last layer's exchange starts first and is in its all-gather once the first layer's starts; the result
    is bitwise the blocking one's, and the same on both replicas."""
    out = run_distributed(2, _overlapped_vs_blocking)
    step = 2 * 4096  # ReplicaExchange tags: (2 * layer) * 4096
    for result in out:
        assert result["phases"] == [(step, 2), (0, 1)]
        assert result["same"]
    for g0, g1 in zip(out[0]["grads"], out[1]["grads"]):
        assert torch.equal(g0[0], g1[1]) and torch.equal(g0[1], g1[0])  # slots (0, 1) on rank 0, (1, 0) on rank 1
