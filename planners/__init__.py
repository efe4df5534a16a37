"""Experiment planners shipped by moe_nnunet (run with `moe_nnunet plan -pl NAME`)."""
from moe_nnunet.planners.m4oe_planner import M4oEPlanner

PLANNERS = {"M4oEPlanner": M4oEPlanner}

__all__ = ["PLANNERS", "M4oEPlanner"]
