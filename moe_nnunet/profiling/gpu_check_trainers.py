"""Trainers of `scripts/gpu_check.sh`: M4oE, nnU-Net's own trainer and the merged model's trainer on a few short
epochs, with everything else nnU-Net's defaults: on CUDA fp16 autocast with a GradScaler and `torch.compile`,
test-time mirroring in validation, the planned network at its full width.

The schedule is read from `MOE_NNUNET_GPU_CHECK_SCHEDULE`, "EPOCHS,ITERATIONS,VALIDATION_ITERATIONS" (default
"3,20,5"; the script's `--cpu-dry-run` sets "1,2,1"). M4oE's expert curriculum covers the first epoch only, so with
two epochs or more both of its phases train (and under DDP the expert heads then go unused). Each trainer prints a
`gpu_check:` line at the start of training with the settings in force, which the check's report reads.

They are not among `moe_nnunet.trainers`: the script writes an `nnUNet_extTrainer` shim for them into its output.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
from moe_nnunet.trainers.merge import nnUNetTrainerMoEMerge
from moe_nnunet.trainers.variants import _Scheduled

__all__ = ["nnUNetTrainerM4oE_gpucheck", "nnUNetTrainer_gpucheck", "nnUNetTrainerMoEMerge_gpucheck",
           "gpu_check_schedule"]

SCHEDULE_VARIABLE = "MOE_NNUNET_GPU_CHECK_SCHEDULE"


def gpu_check_schedule() -> dict:
    """The trainers' schedule from `MOE_NNUNET_GPU_CHECK_SCHEDULE` (see the module docstring)."""
    text = os.environ.get(SCHEDULE_VARIABLE, "3,20,5")
    try:
        epochs, iterations, validation = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{SCHEDULE_VARIABLE}={text!r}: give EPOCHS,ITERATIONS,VALIDATION_ITERATIONS, e.g. 3,20,5"
                         ) from None
    if min(epochs, iterations, validation) < 1:
        raise ValueError(f"{SCHEDULE_VARIABLE}={text!r}: every number must be at least 1.")
    return {"num_epochs": epochs, "num_iterations_per_epoch": iterations, "num_val_iterations_per_epoch": validation}


class _GpuCheck(_Scheduled):
    """The check's schedule, and a `gpu_check:` line with the settings nnU-Net trains with."""
    SCHEDULE = gpu_check_schedule()

    def on_train_start(self):
        super().on_train_start()
        world = torch.distributed.get_world_size() if self.is_ddp else 0
        axes = "".join(str(a) for a in self.inference_allowed_mirroring_axes or ()) or "none"
        self.print_to_log_file(f"gpu_check: device={self.device} compile={self._do_i_compile()} "
                               f"grad_scaler={self.grad_scaler is not None} ddp_world_size={world} "
                               f"mirroring_axes={axes}")


class nnUNetTrainerM4oE_gpucheck(_GpuCheck, nnUNetTrainerM4oE):
    """M4oE on the check's schedule: no warm-up, expert curriculum over the first epoch."""
    SCHEDULE = {**_GpuCheck.SCHEDULE, "warmup_epochs": 0, "curriculum_epochs": 1}


class nnUNetTrainer_gpucheck(_GpuCheck, nnUNetTrainer):
    """nnU-Net's own trainer and network on the check's schedule (the merged model's second expert)."""


class nnUNetTrainerMoEMerge_gpucheck(_GpuCheck, nnUNetTrainerMoEMerge):
    """The merged model's gate on the check's schedule."""
