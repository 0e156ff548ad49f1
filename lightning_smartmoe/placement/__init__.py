"""Expert placement: the slot table of one MoE layer, its cost model, and the planners that choose it."""

from lightning_smartmoe.placement.cost import CostModel, should_switch
from lightning_smartmoe.placement.map import EMPTY, Move, Placement, moves
from lightning_smartmoe.placement.planners import PLANNERS, Planner, plan, plan_balanced, plan_greedy, plan_static

__all__ = [
    "EMPTY",
    "PLANNERS",
    "CostModel",
    "Move",
    "Placement",
    "Planner",
    "moves",
    "plan",
    "plan_balanced",
    "plan_greedy",
    "plan_static",
    "should_switch",
]
