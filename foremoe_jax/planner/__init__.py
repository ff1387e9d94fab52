"""Host-side foresight planner (pure numpy): expert placements and token splits per micro-step and layer.

    cfg = PlanConfig(num_experts=E, num_devices=D, slots_per_device=S, policy="foremoe")
    plan = plan_step(counts_MxLxDxE, cfg, history=None)

See docs/planner.md for the algorithm, its complexity and measured results.
"""

from foremoe_jax.planner.config import POLICIES, CostModel, PlanConfig
from foremoe_jax.planner.plan import Plan
from foremoe_jax.planner.slots import home_placement, slot_token_counts
from foremoe_jax.planner.step import plan_step
from foremoe_jax.planner.traces import counts_from_routes

__all__ = [
    "POLICIES",
    "CostModel",
    "Plan",
    "PlanConfig",
    "counts_from_routes",
    "home_placement",
    "plan_step",
    "slot_token_counts",
]
