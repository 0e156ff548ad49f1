"""The MoE layer against a float64 per-token dense reference, for every gate, with and without capacity."""

import math

import pytest
import torch

from lightning_smartmoe.moe import MoEConfig, MoELayer

B, S, D, H, E = 3, 10, 8, 12, 6


def reference(layer: MoELayer, x: torch.Tensor, seed: int):
    """Route and combine token by token in float64, redrawing the layer's random numbers in the same order.

    Returns (y [B, S, D], aux (scaled), dropped, balance loss, z-loss, per-expert kept load [E]).
    """
    cfg = layer.cfg
    torch.manual_seed(seed)
    xr = x
    if cfg.gate == "switch" and layer.training and cfg.jitter_eps > 0:
        xr = x * torch.empty_like(x).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
    logits = xr.reshape(B * S, D) @ layer.router.weight.T
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.gate != "switch":
        top_w = top_w / top_w.sum(-1, keepdim=True)
    keep = torch.ones(B * S, cfg.top_k, dtype=torch.bool)
    if cfg.gate == "gshard" and layer.training and cfg.random_routing:
        u = torch.rand(B * S)
        keep[:, 1] = u < 2 * top_w[:, 1].detach()
    dropped = 0
    if cfg.capacity_factor is not None:
        cap = math.ceil(cfg.capacity_factor * S * cfg.top_k / E)
        for b in range(B):
            used = [0] * E
            for j in range(cfg.top_k):
                for s in range(S):
                    t = b * S + s
                    if not keep[t, j]:
                        continue
                    e = int(top_i[t, j])
                    if used[e] < cap:
                        used[e] += 1
                    else:
                        keep[t, j] = False
                        dropped += 1
    w1, w2 = layer.experts.w1, layer.experts.w2
    rows = []
    xf = x.reshape(B * S, D)
    for t in range(B * S):
        out = torch.zeros(D, dtype=torch.float64)
        for j in range(cfg.top_k):
            if keep[t, j]:
                e = int(top_i[t, j])
                out = out + top_w[t, j] * (torch.nn.functional.gelu(xf[t] @ w1[e]) @ w2[e])
        rows.append(out)
    f = torch.bincount(top_i.reshape(-1), minlength=E).double() / (B * S * cfg.top_k)
    balance = E * (f * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    aux = cfg.aux_loss_coeff * balance + cfg.z_loss_coeff * z
    load = torch.bincount(top_i[keep], minlength=E)
    return torch.stack(rows).reshape(B, S, D), aux, dropped, balance, z, load


CASES = [
    (gate, k, cf, training)
    for gate, k in (("naive", 2), ("naive", 3), ("gshard", 2), ("switch", 1))
    for cf in (None, 1.0)
    for training in (False, True)
]


@pytest.mark.parametrize("gate,k,cf,training", CASES)
def test_layer_matches_dense_reference(gate, k, cf, training):
    cfg = MoEConfig(num_experts=E, top_k=k, gate=gate, capacity_factor=cf, aux_loss_coeff=0.1, z_loss_coeff=0.01, jitter_eps=0.05)
    torch.manual_seed(0)
    layer = MoELayer(D, H, cfg).double().train(training)
    with torch.no_grad():  # spread router logits so top-k choices are far from ties
        layer.router.weight.mul_(40)
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, S, D, dtype=torch.float64)

    torch.manual_seed(7)
    y, aux = layer(x)
    ((y * g).sum() + aux).backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    stats = layer.stats

    x.grad = None
    layer.zero_grad()
    y_ref, aux_ref, dropped, balance, z, load = reference(layer, x, seed=7)
    ((y_ref * g).sum() + aux_ref).backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert int(stats.dropped) == dropped
    if cf is not None and gate != "switch":
        assert dropped > 0, "the case should exercise capacity dropping"
    torch.testing.assert_close(stats.aux_loss, balance.detach())
    torch.testing.assert_close(stats.z_loss, z.detach())
    assert torch.equal(stats.expert_load, load)


def test_uniform_router_balance_loss_is_one():
    cfg = MoEConfig(num_experts=4, top_k=1)
    layer = MoELayer(D, H, cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(2, 8, D))
    # zero logits: P_e = 1/E; top-1 of ties routes everything to expert 0, so f = (1, 0, 0, 0): loss = E * 1/E = 1
    assert layer.stats.aux_loss.item() == pytest.approx(1.0)
    assert layer.stats.z_loss.item() == pytest.approx(math.log(4) ** 2)
