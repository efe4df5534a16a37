"""Short schedules of the M4oE trainer (for trying plans, tests and CI)."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE

__all__ = ["nnUNetTrainerM4oE_5epochs", "nnUNetTrainerM4oE_debug", "nnUNetTrainerM4oE_demo",
           "nnUNetTrainerM4oE_100epochs", "nnUNetTrainerDemo"]

DEMO_EPOCHS = 10
DEMO_ITERATIONS = 20


class nnUNetTrainerM4oE_5epochs(nnUNetTrainerM4oE):
    """5 epochs: 1 warm-up epoch, expert curriculum over the first 2."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
        self.warmup_epochs = 1
        self.curriculum_epochs = 2


class nnUNetTrainerM4oE_debug(nnUNetTrainerM4oE):
    """2 epochs of 4 training and 2 validation iterations, no test-time mirroring: checks on CPU that plans,
    data and code run."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2
        self.warmup_epochs = 0
        self.curriculum_epochs = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # training still mirrors; validation runs 8x faster
        return configured


class nnUNetTrainerM4oE_demo(nnUNetTrainerM4oE):
    """The CPU demo's schedule: 10 epochs of 20 iterations, 1 warm-up epoch, expert curriculum over 3."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = DEMO_EPOCHS
        self.num_iterations_per_epoch = DEMO_ITERATIONS
        self.num_val_iterations_per_epoch = 5
        self.warmup_epochs = 1
        self.curriculum_epochs = 3


class nnUNetTrainerM4oE_100epochs(nnUNetTrainerM4oE):
    """100 epochs (the GPU demo's schedule), warm-up 5, curriculum 10."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100
        self.warmup_epochs = 5
        self.curriculum_epochs = 10


class nnUNetTrainerDemo(nnUNetTrainer):
    """nnU-Net's own trainer and network with the CPU demo's schedule (the baseline M4oE is compared with)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = DEMO_EPOCHS
        self.num_iterations_per_epoch = DEMO_ITERATIONS
        self.num_val_iterations_per_epoch = 5
