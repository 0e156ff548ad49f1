"""Planning from measurements of the machine: profile.py measures what the placement cost model needs."""

from lightning_smartmoe.planner.profile import agree, expert_flops_per_s, link_bandwidth

__all__ = ["agree", "expert_flops_per_s", "link_bandwidth"]
