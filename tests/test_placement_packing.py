"""The balanced planner's packings (placement/packing.py) and what they buy across nodes, on handcrafted and seeded
random cases."""

import random
from dataclasses import replace

import pytest
import torch

from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.placement import Placement, migration_time, moves, placement_time, plan_balanced
from lightning_smartmoe.placement import packing
from lightning_smartmoe.placement.planners import CLOSE
from lightning_smartmoe.planner.cost import expert_layer_cost
from lightning_smartmoe.planner.hardware import BUILTIN

# SmartMoE's GPT-MoE experts (2560 x 5120) on 16 H100s of two nodes, 4 micro-batches, the exchange hidden twice
TWO_NODES = expert_layer_cost(BUILTIN["h100"], ParallelSizes(dp=16, ep=16), 2560, 5120, "bf16-mixed", micro=4,
                              hidden_phases=2)
MEAN = 16384.0  # rows per rank per step


def _skewed(shares: list[float]) -> list[float]:
    """Expert load [E] in rows, proportional to `shares` (in units of the mean rank load), 16 ranks."""
    return [x / sum(shares) * 16 * MEAN for x in shares]


# one expert takes 49% of the rows, seven more above half a rank each, the rest a trickle or nothing
HOT = _skewed([7.8, 1.3, 1.2, 1.15, 1.1, 1.0, 0.85, 0.65, 0.2, 0.2, 0.15] + [0.05] * 8 + [0.0] * 13)


def _nodes(p: Placement, e: int, per_node: int = 8) -> set[int]:
    return {r // per_node for r in p.ranks_of(e)}


def test_two_nodes_balance_a_hot_expert_and_its_followers():
    got = plan_balanced(torch.tensor(HOT), Placement.contiguous(32, 16, 2), TWO_NODES)
    ranks = got.rank_load(torch.tensor(HOT))
    assert float(ranks.max() / ranks.mean()) < 1.05  # the planner before node-first packing: 1.175
    assert all(len(_nodes(got, e)) == 1 for e in range(32))  # no replica exchange over the network
    assert got.num_replicas[0] == 8 and _nodes(got, 0) != _nodes(got, 1)  # the hot expert fills a node alone
    assert placement_time(TWO_NODES, got, HOT) < 1.03 * TWO_NODES.ideal_time(HOT)


def test_an_expert_heavier_than_a_node_spans_nodes_with_equal_replicas():
    layer = packing.Layer([6.0, 1.0, 1.0, 0.0], Placement.contiguous(4, 4, 2), per_node=2)  # mean rank load 2
    out = packing.by_node(layer, 3, slack=0.0, keep=False)
    placed = Placement.from_rank_experts(out, 4, 3)
    assert placed.ranks_of(0) == (0, 1, 2, 3)  # 6 rows over 2 nodes of 2 ranks at most 2 rows each: 2 + 2 replicas
    assert [len(_nodes(placed, e, 2)) for e in (1, 2, 3)] == [1, 1, 1]
    small = packing.by_node(packing.Layer([2.0, 1.0, 1.0, 0.0], layer.current, 2), 3, slack=0.0, keep=False)
    assert len(_nodes(Placement.from_rank_experts(small, 4, 3), 0, 2)) == 1  # a node's share: stays on one


def test_fill_gives_an_expert_the_fewest_replicas_that_fit_the_room_left():
    out, rank_load = [[0], [0], [0], [0]], [0.9, 0.9, 0.9, 0.8]  # a hot expert leaves 0.1, 0.1, 0.1, 0.2
    packing.fill([(0.2, 1, 0), (0.15, 2, 0), (0.2, 3, 0)], range(4), 3, 1.0, out, rank_load, [[], [], [], []])
    assert [1 in experts for experts in out] == [False, False, False, True]  # fits whole on the roomiest rank
    assert [2 in experts for experts in out] == [True, True, False, False]  # 0.15 fits as 2 x 0.075
    # nowhere under 1.0: the split whose busiest rank ends lowest, 3 x 0.0667 onto 0.9, 0.975, 0.975
    assert [3 in experts for experts in out] == [True, True, True, False]
    assert max(rank_load) == pytest.approx(0.975 + 0.2 / 3)


def test_keep_moves_nothing_across_nodes():
    rng = random.Random(0)
    for _ in range(30):
        current = plan_balanced(torch.tensor([rng.lognormvariate(0, 1.5) for _ in range(32)]),
                                Placement.contiguous(32, 16, 2), TWO_NODES)
        layer = packing.Layer([rng.lognormvariate(0, 1.5) for _ in range(32)], current, 8)
        for slack in (0.0, 0.1):
            kept = Placement.from_rank_experts(packing.by_node(layer, 4, slack, keep=True), 32, 4, current)
            assert all(_nodes(kept, e) <= _nodes(current, e) for e in range(32))


def test_refine_lowers_the_busiest_rank_keeping_replica_counts():
    out = packing.refine([[0, 1], [2, 3]], [5.0, 4.0, 3.0, 3.0], 3, [range(2)])  # 9 | 6 -> swap 5 and 3: 7 | 8
    assert out == [[1, 2], [3, 0]]
    assert packing.refine([[0, 1], [2, 3]], [5.0, 4.0, 3.0, 3.0], 3, [range(1), range(1, 2)]) == [[0, 1], [2, 3]]


def test_align_undoes_any_relabelling_of_nodes_and_ranks():
    current = plan_balanced(torch.tensor(HOT), Placement.contiguous(32, 16, 2), TWO_NODES)
    rng = random.Random(1)
    for _ in range(10):
        node_order = rng.sample(range(2), 2)
        ranks = [node * 8 + r for node in node_order for r in rng.sample(range(8), 8)]
        shuffled = [list(current.rank_experts[r]) for r in ranks]
        assert packing.align(shuffled, packing.Layer(HOT, current, 8)) == [list(e) for e in current.rank_experts]


def test_a_load_that_shifts_inside_a_node_is_rebalanced_inside_it():
    current = plan_balanced(torch.tensor(HOT), Placement.contiguous(32, 16, 2), TWO_NODES)
    drifted = list(HOT)
    drifted[1], drifted[3] = HOT[1] + 0.4 * HOT[3], 0.6 * HOT[3]  # two experts of one node trade some load
    assert _nodes(current, 1) == _nodes(current, 3)
    got = plan_balanced(torch.tensor(drifted), current, TWO_NODES)
    assert got != current and placement_time(TWO_NODES, got, drifted) < placement_time(TWO_NODES, current, drifted)
    assert all(m.src_rank // 8 == m.dst_rank // 8 for m in moves(current, got))  # every copy stays in its node


def test_replanning_the_same_load_moves_only_for_a_clear_gain():
    rng = random.Random(2)
    for _ in range(40):
        ep, per_node = rng.choice([(8, 4), (16, 8), (16, 4)])
        cost = replace(TWO_NODES, ep=ep, ranks_per_node=per_node, hidden_phases=rng.choice([0, 2]))
        load = torch.tensor([float(int(1000 * rng.lognormvariate(0, rng.choice([0.5, 1.5])))) for _ in range(32)])
        first = plan_balanced(load, Placement.contiguous(32, ep, rng.choice([1, 2])), cost)
        again = plan_balanced(load, first, cost)
        before, after = placement_time(cost, first, load), placement_time(cost, again, load)
        assert after <= before
        assert migration_time(cost, first, again) == 0.0 or after * (1 + CLOSE) < before
