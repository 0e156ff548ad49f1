"""Expert placement: the slot table of one MoE layer, the planners that choose it (packing.py: how they lay experts
out on ranks and nodes), when to switch (online.py), migration and the replica gradient exchange. Prices come from
the planner's cost model (planner/cost.py), passed in."""

from lightning_smartmoe.placement.map import EMPTY, Move, Placement, moves
from lightning_smartmoe.placement.online import SwitchRule, migration_time, placement_time
from lightning_smartmoe.placement.planners import PLANNERS, Planner, plan, plan_balanced, plan_greedy, plan_static

__all__ = [
    "EMPTY",
    "PLANNERS",
    "Move",
    "Placement",
    "Planner",
    "SwitchRule",
    "migration_time",
    "moves",
    "placement_time",
    "plan",
    "plan_balanced",
    "plan_greedy",
    "plan_static",
]
