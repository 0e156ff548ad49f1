"""Tensor-parallel layers on 2 gloo ranks match a single-process full-size reference in fp64
(outputs and every gradient). One spawn runs all cases; each returns (got, want) pairs."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed
from torch import nn

from lightning_smartmoe import tensor_parallel as tp
from lightning_smartmoe.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence,
    rank_random,
    scatter_to_sequence,
    vocab_parallel_cross_entropy,
)

B, S, D, H, V = 2, 4, 6, 8, 10


def _chunk(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim)[rank]


def _mlp(group, sequence_parallel: bool):
    torch.manual_seed(0)
    return nn.Sequential(
        ColumnParallelLinear(D, H).double().shard(group, sequence_parallel),
        nn.GELU(),
        RowParallelLinear(H, D).double().shard(group, sequence_parallel),
    )


def _check_mlp(sequence_parallel: bool) -> dict:
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    x, g = torch.randn(B, S, D, dtype=torch.float64), torch.randn(B, S, D, dtype=torch.float64)
    ref, mlp = _mlp(None, False), _mlp(group, sequence_parallel)
    ref_x = x.clone().requires_grad_()
    ref_y = ref(ref_x)
    ref_y.backward(g)

    if sequence_parallel:
        x, g, ref_y, ref_x_grad = (_chunk(t, 1, rank, world) for t in (x, g, ref_y, ref_x.grad))
    else:
        ref_x_grad = ref_x.grad
    x.requires_grad_()
    y = mlp(x)
    y.backward(g)
    out = {"out": (y, ref_y), "input grad": (x.grad, ref_x_grad)}
    for (name, p), ref_p in zip(mlp.named_parameters(), ref.parameters()):
        dim = getattr(p, "tp_shard_dim", None)
        out[f"{name} grad"] = (p.grad, ref_p.grad if dim is None else _chunk(ref_p.grad, dim, rank, world))
        out[f"{name} shard dim"] = (dim, {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": None}[name])
    return out


def _check_embedding() -> dict:
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = nn.Embedding(V, D).double()
    emb = VocabParallelEmbedding(V, D).double()
    emb.load_state_dict(ref.state_dict())
    emb.shard(group)
    idx = torch.randint(0, V, (B, S))
    g = torch.randn(B, S, D, dtype=torch.float64)
    ref_y, y = ref(idx), emb(idx)
    ref_y.backward(g)
    y.backward(g)
    return {
        "out": (y, ref_y),
        "weight grad": (emb.weight.grad, _chunk(ref.weight.grad, 0, rank, world)),
        "state dict keys": (list(emb.state_dict()), ["weight"]),
    }


def _check_cross_entropy() -> dict:
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    logits = 5 * torch.randn(2 * S, V, dtype=torch.float64)
    target = torch.randint(0, V, (2 * S,))
    g = torch.rand(2 * S, dtype=torch.float64)
    ref_logits = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits, target, reduction="none")
    ref_loss.backward(g)
    shard = _chunk(logits, 1, rank, world).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group)
    loss.backward(g)
    return {"loss": (loss, ref_loss), "logits grad": (shard.grad, _chunk(ref_logits.grad, 1, rank, world))}


def _check_sequence_round_trip() -> dict:
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)  # replicated
    g = torch.randn(B, S, D, dtype=torch.float64)
    part = scatter_to_sequence(x, group)
    part.retain_grad()
    full = gather_from_sequence(part, group)
    full.backward(g)
    return {
        "scatter out": (part, _chunk(x.detach(), 1, rank, world)),
        "round trip": (full, x.detach()),
        "gather grad": (part.grad, _chunk(g, 1, rank, world)),
        "scatter grad": (x.grad, g),
    }


def _draw_rank_random() -> dict:
    """Draws inside `rank_random` (twice, so its stream advances) and around it, on the default stream."""
    torch.manual_seed(0)
    before = torch.rand(3)
    with rank_random(dist.group.WORLD, torch.device("cpu")):
        own = torch.rand(3)
    between = torch.rand(3)
    with rank_random(dist.group.WORLD, torch.device("cpu")):
        own_again = torch.rand(3)
    after = torch.rand(3)
    torch.manual_seed(0)
    return {"own": own, "own again": own_again, "default": torch.cat([before, between, after]),
            "default without the regions": torch.rand(9)}


def _all_cases() -> dict:
    return {
        "mlp": _check_mlp(False),
        "mlp sequence parallel": _check_mlp(True),
        "embedding": _check_embedding(),
        "cross entropy": _check_cross_entropy(),
        "sequence round trip": _check_sequence_round_trip(),
        "rank random": _draw_rank_random(),
    }


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(2, _all_cases, timeout=60)


CASES = ["mlp", "mlp sequence parallel", "embedding", "cross entropy", "sequence round trip"]


@pytest.mark.timeout(90)
def test_rank_random_differs_per_rank_and_leaves_the_default_stream_alone(results):
    """Inside the region each TP rank draws its own numbers, which continue from call to call; the default
    stream, used by replicated regions, goes on exactly as if the regions drew nothing."""
    ranks = [r["rank random"] for r in results]
    assert not torch.equal(ranks[0]["own"], ranks[1]["own"])
    for r in ranks:
        assert not torch.equal(r["own"], r["own again"])
        assert torch.equal(r["default"], r["default without the regions"])
    assert torch.equal(ranks[0]["default"], ranks[1]["default"])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES)
def test_matches_single_process(results, case):
    for rank, rank_results in enumerate(results):
        for name, (got, want) in rank_results[case].items():
            if isinstance(got, torch.Tensor):
                where = f"rank {rank} {name}"
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, w=where: f"{w}: {m}")
            else:
                assert got == want, f"rank {rank} {name}: {got} != {want}"


def test_no_group_is_the_plain_layer():
    torch.manual_seed(0)
    x = torch.randn(B, S, D, dtype=torch.float64)
    layers = [(ColumnParallelLinear, nn.Linear, (D, H)), (RowParallelLinear, nn.Linear, (D, H)),
              (VocabParallelEmbedding, nn.Embedding, (V, D))]
    for cls, base, args in layers:
        torch.manual_seed(1)
        plain = base(*args).double()
        torch.manual_seed(1)
        layer = cls(*args).double().shard(None)
        assert all(not hasattr(p, "tp_shard_dim") for p in layer.parameters())
        inp = torch.randint(0, V, (B, S)) if cls is VocabParallelEmbedding else x
        torch.testing.assert_close(layer(inp), plain(inp), rtol=1e-12, atol=1e-12)
    logits, target = torch.randn(B * S, V, dtype=torch.float64), torch.randint(0, V, (B * S,))
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, target, None),
                               F.cross_entropy(logits, target, reduction="none"))
    assert scatter_to_sequence(x, None) is x and gather_from_sequence(x, None) is x


def test_non_divisible_sizes_raise(monkeypatch):
    with pytest.raises(ValueError, match="out_features"):
        tp._shard_size(10, 4, "out_features")
    fake_group = object()  # a 2-rank group as far as the size checks can tell; no communication happens
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match="out_features"):
        ColumnParallelLinear(4, 3).shard(fake_group)
    with pytest.raises(ValueError, match="in_features"):
        RowParallelLinear(3, 4).shard(fake_group)
    with pytest.raises(ValueError, match="num_embeddings"):
        VocabParallelEmbedding(5, 4).shard(fake_group)
    with pytest.raises(ValueError, match="dim 1"):
        scatter_to_sequence(torch.zeros(2, 3, 4), fake_group)
