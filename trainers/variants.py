"""Short schedules of the M4oE trainer (for trying plans, tests and CI)."""
from __future__ import annotations

import torch

from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE

__all__ = ["nnUNetTrainerM4oE_5epochs", "nnUNetTrainerM4oE_debug"]


class nnUNetTrainerM4oE_5epochs(nnUNetTrainerM4oE):
    """5 epochs: 1 warm-up epoch, expert curriculum over the first 2."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
        self.warmup_epochs = 1
        self.curriculum_epochs = 2


class nnUNetTrainerM4oE_debug(nnUNetTrainerM4oE):
    """2 epochs of 4 training and 2 validation iterations: checks that plans, data and code run."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2
        self.warmup_epochs = 0
        self.curriculum_epochs = 1
