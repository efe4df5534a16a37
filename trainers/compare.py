"""Trainers of `moe_nnunet compare`: every model trains the same iteration budget, read from the plans.

`moe_nnunet compare` writes narrowed plans for all models alike and puts the schedule into the 2d configuration
of each (`COMPARE_SCHEDULE_KEY`: epochs, training and validation iterations per epoch), so that a model trained
by hand with `nnUNetv2_train D 2d 0 -tr nnUNetTrainer_compare -p nnUNetPlans_compare` gets the same budget, and
a stopped training resumed with `--c` keeps it. Plans without the key get `DEFAULT_COMPARE_SCHEDULE`.
Validation runs without test-time mirroring (as the `_demo` trainers), and a checkpoint is written after every
epoch, so `--c` loses at most one.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from moe_nnunet.trainers.checkpointing import AtomicCheckpoints
from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
from moe_nnunet.trainers.modality import nnUNetTrainerChannelDropout
from moe_nnunet.trainers.variants import _NoTestTimeMirroring

__all__ = ["COMPARE_SCHEDULE_KEY", "DEFAULT_COMPARE_SCHEDULE", "nnUNetTrainer_compare",
           "nnUNetTrainerChannelDropout_compare", "nnUNetTrainerM4oE_compare", "nnUNetTrainerM4oE1Expert_compare",
           "nnUNetTrainerM4oENaiveLabels_compare"]

COMPARE_SCHEDULE_KEY = "moe_nnunet_compare_schedule"
# 800 iterations: about where nnU-Net's 2d network plateaus on an 80x80 4-channel dataset at batch 12
DEFAULT_COMPARE_SCHEDULE = {"num_epochs": 40, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 5}


class _CompareSchedule(_NoTestTimeMirroring):
    """Mixin: the schedule from the plans' `COMPARE_SCHEDULE_KEY` (or the default), a checkpoint every epoch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = {**DEFAULT_COMPARE_SCHEDULE,
                    **self.configuration_manager.configuration.get(COMPARE_SCHEDULE_KEY, {})}
        unknown = sorted(set(schedule) - set(DEFAULT_COMPARE_SCHEDULE))
        if unknown:
            raise ValueError(f"{COMPARE_SCHEDULE_KEY} in the plans sets {unknown}; only "
                             f"{sorted(DEFAULT_COMPARE_SCHEDULE)} are read. Rewrite the plans with moe_nnunet compare.")
        for name, value in schedule.items():
            setattr(self, name, int(value))
        self.save_every = 1


class nnUNetTrainer_compare(_CompareSchedule, AtomicCheckpoints, nnUNetTrainer):
    """nnU-Net's own trainer and network on the comparison's schedule."""


class nnUNetTrainerChannelDropout_compare(_CompareSchedule, nnUNetTrainerChannelDropout):
    """nnU-Net's network with modality dropout (p = 0.5) on the comparison's schedule."""


class nnUNetTrainerM4oE_compare(_CompareSchedule, nnUNetTrainerM4oE):
    """M4oE on the comparison's schedule; warm-up over the first 5 % of the epochs and the expert curriculum over
    the first 10 %, the fractions of `nnUNetTrainerM4oE_100epochs`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.warmup_epochs = max(1, round(0.05 * self.num_epochs))
        self.curriculum_epochs = max(1, round(0.1 * self.num_epochs))


class nnUNetTrainerM4oE1Expert_compare(nnUNetTrainerM4oE_compare):
    """The comparison's sanity row: M4oE with one expert over all channels (plans written by `moe_nnunet compare`
    as `nnUNetM4oEPlans_compare1Expert`) and no modality dropout, i.e. nnU-Net's task with M4oE's network and
    optimiser; it should come within about a point of `nnUNetTrainer_compare`."""
    modality_dropout_p = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        experts = self.configuration_manager.network_arch_init_kwargs.get("expert_channels")
        if experts is None or len(experts) != 1:
            raise ValueError(f"{type(self).__name__} needs plans with one expert over all channels, but "
                             f"{self.plans_manager.plans_name} has expert_channels {experts}; use the plans "
                             f"nnUNetM4oEPlans_compare1Expert that moe_nnunet compare writes.")


class nnUNetTrainerM4oENaiveLabels_compare(nnUNetTrainerM4oE_compare):
    """M4oE on a dataset combined from datasets that annotate different labels, trained the naive way: a label a
    case's dataset does not annotate is taken for background (no marginal loss, `PartialLabels`). The contrast of
    the partial-label comparison (documentation/partial_labels.md); validation still scores each dataset on its own
    labels."""
    partial_label_loss = False
