"""`moe_nnunet demo`: M4oE against nnU-Net's own network in two settings (`pipeline`)."""
from moe_nnunet.demo.pipeline import MODES, SETTINGS, Pipeline, demo_table, run_demo

__all__ = ["MODES", "SETTINGS", "Pipeline", "demo_table", "run_demo"]
