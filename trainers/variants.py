"""Schedules of the M4oE trainer (for trying plans, tests, CI and the demo), and the demo's baseline.

Each variant changes only its schedule, given as `SCHEDULE`: trainer attributes set after nnU-Net's own
`__init__` (epochs, iterations per epoch, warm-up and curriculum epochs). The `_debug` and `_demo` schedules
validate without test-time mirroring, which costs 8x the time on a CPU; the `_debug` ones also build the
planned network at a quarter of its width.
"""
from __future__ import annotations

import copy

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from moe_nnunet.trainers.checkpointing import AtomicCheckpoints
from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
from moe_nnunet.trainers.modality import nnUNetTrainerChannelDropout
from moe_nnunet.trainers.two_stage import nnUNetTrainerM4oEExperts, nnUNetTrainerM4oEGate

__all__ = ["nnUNetTrainerDebug", "nnUNetTrainerM4oE_5epochs", "nnUNetTrainerM4oE_100epochs", "nnUNetTrainerM4oE_debug",
           "nnUNetTrainerM4oE_demo", "nnUNetTrainerDemo", "nnUNetTrainerChannelDropout_demo",
           "nnUNetTrainerChannelDropout_debug", "nnUNetTrainerM4oEExperts_debug", "nnUNetTrainerM4oEGate_debug",
           "nnUNetTrainerChannelDropout_100epochs", "nnUNetTrainerM4oEExperts_demo", "nnUNetTrainerM4oEGate_demo"]

# the CPU demo trains both models for the same number of iterations
DEMO_SCHEDULE = {"num_epochs": 6, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 1}


class _Scheduled:
    """Mixin: apply the class's `SCHEDULE` after the trainer's own `__init__`. Every key must name an attribute
    the trainer already has (a misspelt key would otherwise add an attribute nothing reads)."""
    SCHEDULE: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.SCHEDULE.items():
            if not hasattr(self, name):
                raise ValueError(f"{type(self).__name__}.SCHEDULE sets {name!r}, which is not an attribute of the "
                                 f"trainer (misspelt?); use one that its __init__ sets, such as num_epochs or "
                                 f"num_iterations_per_epoch.")
            setattr(self, name, value)


class nnUNetTrainerM4oE_5epochs(_Scheduled, nnUNetTrainerM4oE):
    """5 epochs: 1 warm-up epoch, expert curriculum over the first 2."""
    SCHEDULE = {"num_epochs": 5, "warmup_epochs": 1, "curriculum_epochs": 2}


class nnUNetTrainerM4oE_100epochs(_Scheduled, nnUNetTrainerM4oE):
    """100 epochs (the GPU demo's schedule), warm-up 5, curriculum 10."""
    SCHEDULE = {"num_epochs": 100, "warmup_epochs": 5, "curriculum_epochs": 10}


# checkpoint_latest after every epoch, so that a stopped debug run resumes with --c
DEBUG_SCHEDULE = {"num_epochs": 2, "num_iterations_per_epoch": 4, "num_val_iterations_per_epoch": 2,
                  "save_every": 1}


class _NoTestTimeMirroring:
    """Mixin: validate without test-time mirroring (training still mirrors). On a CPU, validation then runs
    8x faster in 3D; the Dice is a little lower than with nnU-Net's default mirroring."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return configured


class _Narrow:
    """Mixin: the planned network (stages, strides, kernels, windows) at a quarter of its width: features per
    stage (at least 8), each expert's width (at least 4) and attention heads (at least 1) divided by 4. For CI and `--quick` runs on a CPU,
    where a training step of the test dataset's M4oE network then takes 0.67 s instead of 2.9 s."""
    WIDTH_DIVISOR = 4

    @classmethod
    def narrow_kwargs(cls, kwargs: dict) -> None:
        """Narrow planned architecture kwargs in place (also used by `moe_nnunet merge` to rebuild the network)."""
        kwargs["features_per_stage"] = [max(8, f // cls.WIDTH_DIVISOR) for f in kwargs["features_per_stage"]]
        if "expert_features_per_stage" in kwargs:
            kwargs["expert_features_per_stage"] = [max(4, w // cls.WIDTH_DIVISOR)
                                                   for w in kwargs["expert_features_per_stage"]]
        if "num_heads" in kwargs:
            widths = kwargs.get("expert_features_per_stage", kwargs["features_per_stage"])
            heads = [max(1, h // cls.WIDTH_DIVISOR) for h in kwargs["num_heads"]]
            kwargs["num_heads"] = [h if w % h == 0 else 1 for h, w in zip(heads, widths)]

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        configuration = copy.deepcopy(configuration_manager.configuration)
        cls.narrow_kwargs(configuration["architecture"]["arch_kwargs"])
        return super().build_network_architecture(plans_manager, ConfigurationManager(configuration),
                                                   num_input_channels, num_output_channels, enable_deep_supervision)


class _Debug(_Narrow, _NoTestTimeMirroring, _Scheduled):
    """2 epochs of 4 training and 2 validation iterations, no test-time mirroring, a quarter of the planned
    width (`_Narrow`): checks on CPU that plans, data and code run."""
    SCHEDULE = DEBUG_SCHEDULE


class _Demo(_NoTestTimeMirroring, _Scheduled):
    """The CPU demo's schedule (`DEMO_SCHEDULE`), validated without test-time mirroring."""
    SCHEDULE = DEMO_SCHEDULE


class nnUNetTrainerDebug(_Debug, AtomicCheckpoints, nnUNetTrainer):
    """nnU-Net's own trainer and network on the `_Debug` schedule (the baseline of `moe_nnunet demo --quick`)."""


class nnUNetTrainerM4oE_debug(_Debug, nnUNetTrainerM4oE):
    """`_Debug` schedule, expert curriculum over the first epoch."""
    SCHEDULE = {**DEBUG_SCHEDULE, "warmup_epochs": 0, "curriculum_epochs": 1}


class nnUNetTrainerChannelDropout_debug(_Debug, nnUNetTrainerChannelDropout):
    """`_Debug` schedule for nnU-Net's network with modality dropout."""


class nnUNetTrainerM4oEExperts_debug(_Debug, nnUNetTrainerM4oEExperts):
    """`_Debug` schedule for stage 1 of the two-stage training."""
    SCHEDULE = {**DEBUG_SCHEDULE, "warmup_epochs": 0}


class nnUNetTrainerM4oEGate_debug(_Debug, nnUNetTrainerM4oEGate):
    """`_Debug` schedule for stage 2: experts frozen in epoch 0, trained in epoch 1."""
    SCHEDULE = {**DEBUG_SCHEDULE, "warmup_epochs": 0}


class nnUNetTrainerM4oE_demo(_Demo, nnUNetTrainerM4oE):
    """The CPU demo's schedule: 6 epochs of 10 iterations, 1 warm-up epoch, expert curriculum over the first."""
    SCHEDULE = {**DEMO_SCHEDULE, "warmup_epochs": 1, "curriculum_epochs": 1}


class nnUNetTrainerDemo(_Demo, AtomicCheckpoints, nnUNetTrainer):
    """nnU-Net's own trainer and network on the CPU demo's schedule (the baseline M4oE is compared with)."""


class nnUNetTrainerChannelDropout_demo(_Demo, nnUNetTrainerChannelDropout):
    """nnU-Net's network with modality dropout on the CPU demo's schedule (the missing-modality baseline)."""


class nnUNetTrainerChannelDropout_100epochs(_Scheduled, nnUNetTrainerChannelDropout):
    """100 epochs, as nnU-Net's `nnUNetTrainer_100epochs` (the GPU comparison's schedule)."""
    SCHEDULE = {"num_epochs": 100}


class nnUNetTrainerM4oEExperts_demo(_Demo, nnUNetTrainerM4oEExperts):
    """Stage 1 on the CPU demo's schedule."""
    SCHEDULE = {**DEMO_SCHEDULE, "warmup_epochs": 1}


class nnUNetTrainerM4oEGate_demo(_Demo, nnUNetTrainerM4oEGate):
    """Stage 2 on the CPU demo's schedule (experts frozen for 3 epochs, then fine-tuned)."""
    SCHEDULE = {**DEMO_SCHEDULE, "warmup_epochs": 1}
