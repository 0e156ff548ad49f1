"""The MoE layer against a float64 per-token dense reference, for every gate, with and without capacity, and for
the newer parts: SwiGLU experts, shared experts (gated or not), sigmoid scores, the expert bias, group-limited
routing. The aux-loss-free bias balances a skewed router."""

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
    scores = torch.softmax(logits, dim=-1) if cfg.score == "softmax" else torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)
    select = scores.detach().clone()
    if layer.router.expert_bias is not None:
        select += layer.router.expert_bias
    if cfg.groups > 1:  # a group ranks by the sum of its best k / group_top_k scores
        grouped = select.view(B * S, cfg.groups, -1)
        best = grouped.topk(cfg.top_k // cfg.group_top_k, dim=-1).values.sum(-1).topk(cfg.group_top_k, dim=-1).indices
        outside = torch.ones(B * S, cfg.groups, dtype=torch.bool).scatter_(1, best, False)
        select = grouped.masked_fill(outside.unsqueeze(-1), -torch.inf).view(B * S, -1)
    top_i = torch.topk(select, cfg.top_k, dim=-1).indices
    top_w = scores.gather(1, top_i)
    if cfg.gate != "switch" and cfg.renormalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    top_w = top_w * cfg.scaling_factor
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
    w1, w2, w3 = layer.experts.w1, layer.experts.w2, layer.experts.w3
    rows = []
    xf = x.reshape(B * S, D)
    act = torch.nn.functional.gelu if w3 is None else torch.nn.functional.silu
    for t in range(B * S):
        out = torch.zeros(D, dtype=torch.float64)
        for j in range(cfg.top_k):
            if keep[t, j]:
                e = int(top_i[t, j])
                h = act(xf[t] @ w1[e]) * (1 if w3 is None else xf[t] @ w3[e])
                out = out + top_w[t, j] * (h @ w2[e])
        if layer.shared is not None:  # one dense FFN of the shared experts' hidden units, optionally gated
            s = layer.shared
            if w3 is None:
                shared = s.proj.weight @ torch.nn.functional.gelu(s.fc.weight @ xf[t] + s.fc.bias) + s.proj.bias
            else:
                shared = s.down_proj.weight @ (torch.nn.functional.silu(s.gate_proj.weight @ xf[t]) * (s.up_proj.weight @ xf[t]))
            gate = 1 if layer.shared_gate is None else torch.sigmoid(layer.shared_gate.weight[0] @ xf[t])
            out = out + gate * shared
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


NEW_PARTS = [  # (MoEConfig fields, training)
    (dict(activation="swiglu"), True),
    (dict(activation="swiglu", shared_experts=1, shared_expert_gate=True, capacity_factor=1.0), True),
    (dict(shared_experts=2, shared_expert_hidden=20), False),  # GELU shared experts
    (dict(activation="swiglu", score="sigmoid", bias_update_rate=0.1, shared_experts=1), True),
    (dict(score="sigmoid", groups=3, group_top_k=2, renormalize=False, scaling_factor=2.5), True),
    (dict(groups=2, group_top_k=1, bias_update_rate=0.1, top_k=3), False),
]


@pytest.mark.parametrize("gate,k,cf,training", CASES)
def test_layer_matches_dense_reference(gate, k, cf, training):
    _check_against_reference(dict(top_k=k, gate=gate, capacity_factor=cf), training)


@pytest.mark.parametrize("fields,training", NEW_PARTS)
def test_new_parts_match_dense_reference(fields, training):
    _check_against_reference(fields, training)


def _check_against_reference(fields: dict, training: bool) -> None:
    cfg = MoEConfig(**{"num_experts": E, "top_k": 2, "aux_loss_coeff": 0.1, "z_loss_coeff": 0.01, "jitter_eps": 0.05, **fields})
    gate, cf = cfg.gate, cfg.capacity_factor
    torch.manual_seed(0)
    layer = MoELayer(D, H, cfg).double().train(training)
    with torch.no_grad():  # spread router logits so top-k choices are far from ties
        layer.router.weight.mul_(40)
        if layer.router.expert_bias is not None:  # a bias that changes the choice
            layer.router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E, dtype=torch.float64))
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


def test_expert_bias_balances_a_skewed_router_without_aux_loss():
    """Sigmoid scores that send most tokens to a few experts (max/mean load above 2); with the aux loss off, moving
    the selection bias by the sign of each step's load error brings max/mean below 1.2 within 300 steps, while the
    combine weights stay the unbiased scores."""
    from lightning_smartmoe.moe.router import Router

    cfg = MoEConfig(num_experts=8, top_k=2, score="sigmoid", bias_update_rate=0.01, aux_loss_coeff=0.0)
    gen = torch.Generator().manual_seed(0)
    router = Router(16, cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16, generator=gen))
    skew = 0.5 * torch.randn(16, generator=gen)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(4, 64, 16, generator=gen) + skew
        with torch.no_grad():
            routing = router(x)
            scores = torch.sigmoid(x.reshape(-1, 16) @ router.weight.T).gather(1, routing.expert_ids)
        return routing.routed, routing.weights, scores / scores.sum(-1, keepdim=True)

    def imbalance(load: torch.Tensor) -> float:
        return float(load.max() / load.double().mean())

    first, _, _ = step()
    assert imbalance(first) > 2
    for _ in range(300):
        load, weights, scores = step()
        router.update_bias(load)
    recent = sum(step()[0] for _ in range(10))
    assert imbalance(recent) < 1.2, recent.tolist()
    assert router.expert_bias.abs().max() > 0.1
    torch.testing.assert_close(weights, scores)
