"""nnU-Net trainers shipped by moe_nnunet (found by nnU-Net through `moe_nnunet trainer_path`)."""
from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
from moe_nnunet.trainers.variants import nnUNetTrainerM4oE_5epochs, nnUNetTrainerM4oE_debug

__all__ = ["nnUNetTrainerM4oE", "nnUNetTrainerM4oE_5epochs", "nnUNetTrainerM4oE_debug"]
