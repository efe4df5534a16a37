"""The trainer of merged models (`moe_nnunet merge`): frozen trained nnU-Net models, only the gate learns.

    moe_nnunet merge -d D -m MODEL_FOLDER_1 MODEL_FOLDER_2 -o nnUNetMergedPlans
    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerMoEMerge -p nnUNetMergedPlans

SAM-Med3D-MoE's recipe (Wang et al., "SAM-Med3D-MoE: Towards a Non-Forgetting Segment Anything Model via
Mixture of Experts for 3D Medical Image Segmentation", MICCAI 2024): the experts keep their trained weights, so
the merged model forgets nothing; the gate is `moe_nnunet.networks.merged.MergedExpertsNet`'s.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from moe_nnunet.networks.merged import MERGED_NETWORK_CLASS, MergedExpertsNet, MergedOutput
from moe_nnunet.trainers.checkpointing import AtomicCheckpoints, load_checkpoint_file
from moe_nnunet.trainers.variants import DEBUG_SCHEDULE, DEMO_SCHEDULE, _NoTestTimeMirroring, _Scheduled
from moe_nnunet.training import WarmupPolyLRScheduler, adamw_param_groups, unwrapped

__all__ = ["EXPERTS_KEY", "MergedLoss", "nnUNetTrainerMoEMerge", "nnUNetTrainerMoEMerge_debug",
           "nnUNetTrainerMoEMerge_demo"]

EXPERTS_KEY = "merged_experts"  # configuration entry of merged plans: where each expert's checkpoints are


def expert_checkpoint(entry: dict, gate_fold) -> str:
    """The checkpoint of one expert (an `EXPERTS_KEY` entry) for gate fold `gate_fold`: the expert's fold fixed
    by `moe_nnunet merge -f`, or else the same fold as the gate's."""
    fold = gate_fold if entry.get("fold") is None else entry["fold"]
    return os.path.join(entry["model_folder"], f"fold_{fold}", entry.get("checkpoint", "checkpoint_final.pth"))


class MergedLoss(nn.Module):
    """nnU-Net's loss on the merged network's logits. In training the network returns a `MergedOutput`: this
    unpacks it and sums the batches' gate weights for the epoch's log, outside the network's `forward` (where
    state kept on the module would make `torch.compile` recompile at every step).

    Args:
        loss: nnU-Net's loss for one logit map.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self._weight_sum: torch.Tensor | None = None   # (L, E) gate weights summed over training steps
        self._weight_steps = 0

    def forward(self, output: torch.Tensor | MergedOutput, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, MergedOutput):
            weights = output.gate_weights                                                 # (L, E)
            self._weight_sum = weights if self._weight_sum is None else self._weight_sum + weights
            self._weight_steps += 1
            output = output.logits
        return self.loss(output, target)

    def pop_gate_weights(self) -> torch.Tensor | None:
        """Mean selected weight per (label, expert) over the training steps since the last call, (L, E)."""
        if self._weight_sum is None:
            return None
        mean = self._weight_sum / self._weight_steps
        self._weight_sum, self._weight_steps = None, 0
        return mean


class nnUNetTrainerMoEMerge(AtomicCheckpoints, nnUNetTrainer):
    """Trains only the gate of a merged model; the experts are loaded from their checkpoints and stay frozen.

    Changes to nnU-Net's default trainer:
      * network: `MergedExpertsNet` from plans written by `moe_nnunet merge`; at `initialize` each expert gets
        its weights from its own model folder (expert fold = gate fold, or the fold chosen at merge time);
        those folders are not read again: the merged checkpoints hold every weight, so `nnUNetv2_predict`
        and exported zips need nothing else;
      * experts frozen: no gradient, not in the optimiser, always in eval mode (the network's `train` keeps
        them there);
      * no deep supervision; nnU-Net's DC+CE loss on the merged output (log-probabilities as logits), through
        `MergedLoss`, which also collects the gate weights the network returns in training;
      * optimiser: AdamW (lr 1e-3, weight decay 1e-4 on weights) with nnU-Net's poly decay, 100 epochs;
      * the training log shows each epoch's mean gate weight per label and expert.
    `--c` and `--val` take the experts from the merged checkpoint, not from their folders.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.configuration_manager.network_arch_class_name != MERGED_NETWORK_CLASS:
            raise RuntimeError(
                f"nnUNetTrainerMoEMerge trains the gate of a merged model, but plans {self.plans_manager.plans_name} "
                f"describe {self.configuration_manager.network_arch_class_name}. Write merged plans with "
                f"`moe_nnunet merge -d {self.plans_manager.dataset_name} -m MODEL_FOLDER ... -o PLANS_NAME` and "
                f"train with -p PLANS_NAME.")
        self.experts = self.configuration_manager.configuration[EXPERTS_KEY]
        self.enable_deep_supervision = False
        self.num_epochs = 100
        self.initial_lr = 1e-3
        self.weight_decay = 1e-4
        self._experts_in_checkpoint = False

    @property
    def merged_network(self) -> MergedExpertsNet:
        """The network without its DDP / torch.compile wrappers."""
        return unwrapped(self.network)

    def initialize(self):
        super().initialize()
        if not self._experts_in_checkpoint:
            self.load_experts()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._experts_in_checkpoint = True  # --c / --val: the merged checkpoint holds the experts
        super().load_checkpoint(filename_or_checkpoint)

    def load_experts(self) -> None:
        """Each expert's weights from its checkpoint for this fold (strict: every tensor, same shapes)."""
        for entry, name, expert in zip(self.experts, self.merged_network.expert_names, self.merged_network.experts):
            path = expert_checkpoint(entry, self.fold)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"expert {name} has no checkpoint {path} for gate fold {self.fold}. Train that fold of the "
                    f"expert, or merge again with -f FOLD to use one fold of the experts for every gate fold.")
            weights = load_checkpoint_file(path, map_location="cpu")["network_weights"]
            expert.load_state_dict(weights)
            self.print_to_log_file(f"expert {name}: weights from {path}")

    def _build_loss(self):
        return MergedLoss(super()._build_loss())

    def configure_optimizers(self):
        groups = adamw_param_groups(self.network, self.weight_decay)  # trainable parameters only: the gate's
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup_steps=0)

    def set_deep_supervision_enabled(self, enabled: bool):
        """Nothing to switch: the merged network has no deep supervision (nnU-Net's version sets
        `network.decoder.deep_supervision`)."""

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        weights = self.loss.pop_gate_weights()
        if weights is None:
            return
        labels = {int(v): k for k, v in self.dataset_json["labels"].items() if k != "ignore"}
        net = self.merged_network
        lines = [f"  {labels.get(l, l)}: " + ", ".join(f"{name} {float(weights[l, e]):.3f}"
                                                      for e, name in enumerate(net.expert_names) if net.available[l, e])
                 for l in range(weights.shape[0])]
        self.print_to_log_file("mean gate weight per label (training):\n" + "\n".join(lines))


class nnUNetTrainerMoEMerge_debug(_NoTestTimeMirroring, _Scheduled, nnUNetTrainerMoEMerge):
    """The `_Debug` schedule (2 epochs of 4 iterations, no test-time mirroring) without its quarter width
    (`_Narrow`): the frozen experts must keep the shapes of their checkpoints, and the gate is small anyway."""
    SCHEDULE = DEBUG_SCHEDULE


class nnUNetTrainerMoEMerge_demo(_NoTestTimeMirroring, _Scheduled, nnUNetTrainerMoEMerge):
    """The CPU demo's schedule (6 epochs of 10 iterations), validated without test-time mirroring."""
    SCHEDULE = DEMO_SCHEDULE
