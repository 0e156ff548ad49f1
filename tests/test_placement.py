"""Placement map, moves, cost model and planners, on handcrafted and seeded random cases."""

import random
from dataclasses import replace

import pytest
import torch

from lightning_smartmoe.placement import (
    CostModel,
    Placement,
    moves,
    plan,
    plan_balanced,
    plan_greedy,
    plan_static,
    should_switch,
)

COST = CostModel()


def max_load(placement: Placement, load) -> float:
    return float(placement.rank_load(torch.as_tensor(load, dtype=torch.float64)).max())


# ---------------------------------------------------------------- map


def test_contiguous_layout_and_lookups():
    p = Placement.contiguous(8, 4, extra_slots=1)
    assert p.slots_per_rank == 3
    assert p.slot_expert == (0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1)
    assert p.slot_table.tolist() == list(p.slot_expert)
    assert p.replicas_of(5) == (7,) and p.ranks_of(5) == (2,)
    assert p.num_replicas.tolist() == [1] * 8
    assert p.rank_experts == ((0, 1), (2, 3), (4, 5), (6, 7))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 2, (0, 1, 2, -1)), r"experts \[3\] have no slot"),
        ((4, 2, (0, 0, 1, 2, 3, -1)), "expert 0 is held twice on rank 0"),
        ((4, 2, (0, 1, 2, 4)), r"expert in \[0, 4\); got 4"),
        ((4, 3, (0, 1, 2, 3)), "multiple of ep=3"),
        ((0, 2, (0, 1)), "must be integers >= 1"),
    ],
)
def test_invalid_tables_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        Placement(*args)


def test_contiguous_needs_divisible_experts():
    with pytest.raises(ValueError, match="must divide"):
        Placement.contiguous(6, 4)


def test_equality_and_hash_follow_the_table():
    a = Placement(4, 2, (0, 1, 2, 3))
    b = Placement(4, 2, [0, 1, 2, 3])
    c = Placement(4, 2, (0, 3, 2, 1))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2


def test_from_rank_experts_keeps_slots_of_experts_that_stay():
    keep = Placement(4, 2, (0, 1, 2, 3))
    p = Placement.from_rank_experts([[3, 0], [1, 2]], 4, 2, keep=keep)
    assert p.slot_expert == (0, 3, 2, 1)  # 0 and 2 stay put; 3 and 1 take the freed slots


def test_route_splits_replicas_in_contiguous_chunks():
    p = Placement(2, 2, (0, 1, 0, -1))  # expert 0 in slots 0 and 2, expert 1 in slot 1
    ids = torch.tensor([[0, 1], [0, -1], [0, 0], [1, 0]])
    # expert 0's five assignments in flattened order go to replica floor(i * 2 / 5) = 0, 0, 0, 1, 1
    assert p.route(ids).tolist() == [[0, 1], [0, -1], [0, 2], [1, 2]]


def _route_reference(p: Placement, ids: torch.Tensor) -> list[int]:
    flat = ids.reshape(-1).tolist()
    n = {e: flat.count(e) for e in set(flat) if e >= 0}
    seen: dict[int, int] = {}
    out = []
    for e in flat:
        if e < 0:
            out.append(-1)
            continue
        i = seen.get(e, 0)
        seen[e] = i + 1
        slots = p.replicas_of(e)
        out.append(slots[i * len(slots) // n[e]])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_route_matches_reference_and_is_balanced(seed):
    # expert 0 on ranks 0, 1, 2; expert 1 on ranks 0, 3; experts 2 and 3 once
    p = Placement(4, 4, (0, 1, 0, 2, 0, 3, 1, -1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 4, (257, 2), generator=g)
    slots = p.route(ids)
    assert slots.shape == ids.shape
    assert slots.reshape(-1).tolist() == _route_reference(p, ids)
    for e in range(4):
        n, r = int((ids == e).sum()), len(p.replicas_of(e))
        got = [int((slots == s).sum()) for s in p.replicas_of(e)]
        assert sum(got) == n and set(got) <= {n // r, -(-n // r)}


def test_route_rejects_unknown_experts():
    with pytest.raises(ValueError, match="out of range"):
        Placement.contiguous(4, 2).route(torch.tensor([[0, 4]]))


def test_rank_load_shares_replicas_and_keeps_batch_dims():
    p = Placement(2, 2, (0, 1, 0, -1))
    assert p.rank_load(torch.tensor([10.0, 4.0])).tolist() == [9.0, 5.0]
    assert p.rank_load(torch.tensor([[10.0, 4.0], [2.0, 0.0]])).tolist() == [[9.0, 5.0], [1.0, 1.0]]


# ---------------------------------------------------------------- moves


def test_moves_count_exactly_the_changed_slots():
    old = Placement.contiguous(4, 2, extra_slots=1)  # (0, 1, - | 2, 3, -)
    new = Placement(4, 2, (0, 3, 2, 1, 2, -1))
    got = [(m.expert, m.src, m.dst, m.local) for m in moves(old, new)]
    assert got == [(3, 4, 1, False), (2, 3, 2, False), (1, 1, 3, False), (2, 3, 4, True)]
    back = [(m.expert, m.src, m.dst, m.local) for m in moves(new, old)]
    assert back == [(1, 3, 1, False), (2, 4, 3, True), (3, 1, 4, False)]  # slot 2 emptied: no copy
    assert moves(old, old) == ()


def test_moves_spread_sources_over_old_replicas():
    old = Placement(2, 4, (0, 0, 1, 1))
    new = Placement(2, 4, (1, 1, 0, 0))
    assert [(m.src, m.dst) for m in moves(old, new)] == [(2, 0), (3, 1), (0, 2), (1, 3)]


def test_moves_need_same_shape():
    with pytest.raises(ValueError, match="differ in shape"):
        moves(Placement.contiguous(4, 2), Placement.contiguous(4, 2, 1))


# ---------------------------------------------------------------- cost model and the min_gain rule

# 1 s per token, 1 s per expert gradient sent once, 2 s per migrated expert
TOY = CostModel(expert_params=1000, flops_per_s=6000, bandwidth=1000, grad_bytes_per_param=1, state_bytes_per_param=2)


def test_cost_model_by_hand():
    old = Placement.contiguous(4, 2, extra_slots=1)
    new = Placement(4, 2, (0, 1, -1, 2, 3, 0))  # expert 0 replicated onto rank 1
    load = torch.tensor([6.0, 1.0, 1.0, 0.0])
    assert TOY.step_time(old, load) == pytest.approx(7.0)  # rank 0: 6 + 1 tokens
    assert TOY.step_time(new, load) == pytest.approx(4.0 + 1.0)  # 3 + 1 | 1 + 0 + 3, plus one gradient exchange
    assert TOY.migration_time(old, new) == pytest.approx(2.0)
    assert TOY.switch_gain(old, new, load, steps=1) == pytest.approx(0.0)
    assert not should_switch(TOY, old, new, load, steps=1, min_gain=0.0)  # gain must exceed min_gain
    assert should_switch(TOY, old, new, load, steps=2, min_gain=1.5)
    assert not should_switch(TOY, old, new, load, steps=2, min_gain=2.0)
    assert not should_switch(TOY, old, old, load, steps=100, min_gain=float("-inf"))
    # three replicas: reduce-scatter + all-gather send 2 (r - 1) / r of the gradient per replica
    everywhere = Placement(3, 3, (0, 1, 0, 2, 0, -1))
    assert TOY.step_time(everywhere, torch.tensor([3.0, 1.0, 1.0])) == pytest.approx(2.0 + 4.0 / 3.0)
    # backward hides each phase (half the traffic) under one more MoE layer's backward, 2/3 of compute at most
    hidden_once, hidden_twice = replace(TOY, hiding_layers=1), replace(TOY, hiding_layers=2)
    assert hidden_once.step_time(new, load) == pytest.approx(4.0 + 0.5)
    assert hidden_twice.step_time(new, load) == pytest.approx(4.0)
    slow_link = replace(TOY, hiding_layers=2, bandwidth=200)  # each phase takes 2.5 s; 8/3 s of backward hide it
    assert slow_link.step_time(new, load) == pytest.approx(4.0)
    slower = replace(TOY, hiding_layers=5, bandwidth=100)  # 5 s per phase, 8/3 s hidden each
    assert slower.step_time(new, load) == pytest.approx(4.0 + 2 * (5.0 - 8.0 / 3.0))


def test_time_bound_is_a_lower_bound():
    rng = random.Random(0)
    for _ in range(50):
        E, ep = 16, 4
        load = [float(rng.randint(0, 1000)) for _ in range(E)]
        p = plan_balanced(torch.tensor(load), Placement.contiguous(E, ep, 2), CostModel(grad_bytes_per_param=0.5))
        replicas = p.num_replicas.tolist()
        for cost in (TOY, replace(TOY, hiding_layers=1), replace(TOY, hiding_layers=2, bandwidth=30)):
            assert cost.time_bound(replicas, load, ep) <= cost.step_time(p, torch.tensor(load)) + 1e-9


@pytest.mark.parametrize("field", ["flops_per_s", "bandwidth", "state_bytes_per_param", "expert_params"])
def test_cost_model_refuses_non_positive(field):
    with pytest.raises(ValueError, match=f"cost.{field}"):
        CostModel(**{field: 0})


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_cost_model_refuses_bad_hiding_layers(value):
    with pytest.raises(ValueError, match="cost.hiding_layers"):
        CostModel(hiding_layers=value)


# ---------------------------------------------------------------- planners


def test_static_ignores_load():
    current = Placement(4, 2, (3, 2, -1, 1, 0, -1))
    assert plan_static(torch.tensor([9.0, 0, 0, 0]), current, COST) == Placement.contiguous(4, 2, 1)


def test_greedy_follows_smartmoe_rule():
    current = Placement.contiguous(4, 2)
    # 10 -> rank 0 (tie 0/0, its rank), 6 -> rank 1, 5 -> rank 1 (6 < 10), 1 -> rank 0 (rank 1 full); max 11 < 16
    assert plan_greedy(torch.tensor([10.0, 6, 5, 1]), current, COST).slot_expert == (0, 3, 2, 1)


def test_greedy_ties_prefer_the_current_rank():
    # same load, expert 0 now on rank 1: the opening tie sends it there
    current = Placement(4, 2, (2, 3, 0, 1))
    assert plan_greedy(torch.tensor([10.0, 6, 5, 1]), current, COST).slot_expert == (2, 1, 0, 3)
    # mid-way tie: expert 2 meets ranks at 4 and 4 and stays on its rank 1 (lowest index would say rank 0)
    got = plan_greedy(torch.tensor([4.0, 4, 2, 2]), Placement.contiguous(4, 2), COST)
    assert got.slot_expert == (0, 3, 2, 1)


def test_greedy_switches_only_if_max_load_strictly_drops():
    current = Placement.contiguous(4, 2)
    # the LPT answer (0, 3 | 1, 2) ties the current max of 10, so the current placement is kept
    assert plan_greedy(torch.tensor([5.0, 5, 5, 5]), current, COST) == current


def test_greedy_is_a_permutation_leaving_extra_slots_empty():
    got = plan_greedy(torch.tensor([9.0, 1, 1, 1]), Placement.contiguous(4, 2, extra_slots=2), COST)
    assert got.num_replicas.tolist() == [1, 1, 1, 1]
    assert all(len(experts) == 2 for experts in got.rank_experts)


def _random_case(rng: random.Random):
    E = rng.choice([4, 8, 16, 32])
    ep = rng.choice([d for d in (1, 2, 4, 8, 16) if E % d == 0])
    extra = rng.choice([0, 1, 2, 3])
    skew = rng.choice([0.3, 1.0, 2.0])
    load = [float(int(1000 * rng.lognormvariate(0, skew))) for _ in range(E)]
    if rng.random() < 0.3:
        load[rng.randrange(E)] *= 20
    return E, ep, extra, load


@pytest.mark.parametrize("grad_bytes", [0, 4])
def test_balanced_never_worse_than_greedy_respects_budget_and_is_deterministic(grad_bytes):
    rng = random.Random(grad_bytes)
    cost = CostModel(grad_bytes_per_param=grad_bytes)
    for _ in range(150):
        E, ep, extra, load = _random_case(rng)
        current = Placement.contiguous(E, ep, extra)
        if rng.random() < 0.5:  # start from an earlier balanced answer, replicas included
            current = plan_balanced(torch.tensor([rng.random() * 1e5 for _ in range(E)]), current, cost)
        loads = torch.tensor(load)
        got = plan_balanced(loads, current, cost)
        greedy = plan_greedy(loads, current, cost)
        assert max_load(got, load) <= max_load(greedy, load)
        assert cost.step_time(got, loads) <= cost.step_time(greedy, loads)
        assert (got.ep, got.slots_per_rank, got.num_experts) == (ep, current.slots_per_rank, E)
        assert int(got.num_replicas.sum()) <= ep * current.slots_per_rank
        if extra == 0:
            assert got.num_replicas.tolist() == [1] * E
        assert plan_balanced(list(load), current, cost) == got  # pure: same input, same answer


def test_balanced_replicates_hot_experts_when_it_pays():
    load = torch.tensor([8e6, 5e5, 5e5, 5e5, 5e5, 5e5, 5e5, 5e5])  # one expert takes 70% of the tokens
    current = Placement.contiguous(8, 4, extra_slots=2)
    greedy = plan_greedy(load, current, COST)
    got = plan_balanced(load, current, COST)
    mean = float(load.sum()) / 4
    assert max_load(greedy, load) / mean > 2.7
    assert max_load(got, load) / mean < 1.2
    assert got.num_replicas[0] >= 3


def test_balanced_skips_replicas_whose_all_reduce_costs_more():
    load = torch.tensor([800.0, 50, 50, 50, 50, 50, 50, 50])  # so few tokens that a gradient sync outweighs them
    got = plan_balanced(load, Placement.contiguous(8, 4, extra_slots=2), COST)
    assert got.num_replicas.tolist() == [1] * 8
    assert plan_balanced(load, Placement.contiguous(8, 4, 2), CostModel(grad_bytes_per_param=0)).num_replicas[0] > 1


def test_plan_dispatch_and_unknown_policy():
    current = Placement.contiguous(4, 2)
    load = torch.tensor([10.0, 6, 5, 1])
    assert plan("greedy", load, current, COST) == plan_greedy(load, current, COST)
    with pytest.raises(ValueError, match="allowed: static, greedy, balanced"):
        plan("lpt", load, current, COST)


def test_planners_refuse_bad_loads():
    with pytest.raises(ValueError, match="4 finite values >= 0"):
        plan_greedy(torch.tensor([1.0, -1, 0, 0]), Placement.contiguous(4, 2), COST)
