"""nnU-Net trainers shipped by moe_nnunet (found by nnU-Net through `moe_nnunet trainer_path`)."""
from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
from moe_nnunet.trainers.variants import (nnUNetTrainerDemo, nnUNetTrainerM4oE_5epochs, nnUNetTrainerM4oE_100epochs,
                                          nnUNetTrainerM4oE_debug, nnUNetTrainerM4oE_demo)

__all__ = ["nnUNetTrainerM4oE", "nnUNetTrainerM4oE_5epochs", "nnUNetTrainerM4oE_debug", "nnUNetTrainerM4oE_demo",
           "nnUNetTrainerM4oE_100epochs", "nnUNetTrainerDemo"]
