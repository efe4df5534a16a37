"""Plain-torch networks of moe_nnunet (no nnunetv2 import here)."""
from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
from moe_nnunet.networks.gating import ExpertGate, router_z_loss, switch_balance_loss
from moe_nnunet.networks.m4oe_unet import M4oEUNet, MoEEncoder

__all__ = ["M4OE_NETWORK_CLASS", "m4oe_arch_kwargs", "ExpertGate", "router_z_loss", "switch_balance_loss",
           "M4oEUNet", "MoEEncoder"]
