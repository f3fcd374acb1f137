"""``gig-dist plan``: what a run will take, before it runs. ``core`` sizes every stage (arrays,
memory, time) from the stages' own specs and footprints, ``calibration`` measures a small real
run to scale from, ``render`` prints the plan."""

from gig_dist.plan.calibration import calibrate_run
from gig_dist.plan.core import (
    ArrayPlan,
    GiB,
    Plan,
    StagePlan,
    cluster_misfits,
    footprint,
    make_plan,
    pfv_tradeoff,
    plan_facts,
    project_seconds,
)
from gig_dist.plan.render import render

__all__ = ["ArrayPlan", "GiB", "Plan", "StagePlan", "calibrate_run", "cluster_misfits", "footprint", "make_plan",
           "pfv_tradeoff", "plan_facts", "project_seconds", "render"]
