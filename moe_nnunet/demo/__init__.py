"""`moe_nnunet demo`: M4oE against nnU-Net's own network on one budget in two settings (`pipeline`); what it runs
and at which size per mode (`scale`); its tables (`summary`)."""
from moe_nnunet.demo.pipeline import run_demo, run_setting
from moe_nnunet.demo.scale import SCALES, SETTINGS
from moe_nnunet.demo.summary import demo_table

__all__ = ["SCALES", "SETTINGS", "demo_table", "run_demo", "run_setting"]
