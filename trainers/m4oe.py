"""nnU-Net trainers for the M4oE network (modality experts + gate)."""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
from moe_nnunet.training import MoETrainingLoss, WarmupPolyLRScheduler, adamw_param_groups

__all__ = ["nnUNetTrainerM4oE"]


class nnUNetTrainerM4oE(nnUNetTrainer):
    """M4oE in nnU-Net: one Swin expert per modality, a per-token gate at every scale, nnU-Net's decoder.

    Changes to nnU-Net's default trainer:
      * network: `M4oEUNet`, from `moe_nnunet plan` plans or derived from nnU-Net's own plans (same patch,
        strides and channels) when the plans name another network;
      * optimiser: AdamW (lr 3e-4, weight decay 0.05 on weights only) with a 10-epoch linear warm-up then
        nnU-Net's poly decay. SGD at nnU-Net's 1e-2 makes Swin encoders diverge;
      * loss: nnU-Net's DC+CE with deep supervision, plus the routers' balance and z-losses, plus a
        curriculum (MoME, Zhang et al., MICCAI 2024): each expert first learns its own modality through a
        light head of its own (`mixture_weight` 0 at epoch 0), and the gated mixture takes over linearly
        until `curriculum_epochs` (weight 1); the expert heads are then switched off.
    Everything is a function of the epoch, so `--c` resumes on the same schedule.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 3e-4
        self.weight_decay = 0.05
        self.warmup_epochs = 10
        self.curriculum_epochs = 50

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = configuration_manager.network_arch_init_kwargs
        if configuration_manager.network_arch_class_name != M4OE_NETWORK_CLASS:
            kwargs = m4oe_arch_kwargs(configuration_manager.patch_size, kwargs, num_input_channels)
        return get_network_from_plans(M4OE_NETWORK_CLASS, kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    @property
    def moe_network(self) -> nn.Module:
        """The network without its DDP / torch.compile wrappers."""
        mod = self.network.module if isinstance(self.network, DDP) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(adamw_param_groups(self.network, self.weight_decay), lr=self.initial_lr)
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
        return optimizer, scheduler

    def _build_loss(self):
        mixture = super()._build_loss()
        expert = mixture.loss if isinstance(mixture, DeepSupervisionWrapper) else mixture
        return MoETrainingLoss(mixture, expert, self.moe_network)

    def mixture_weight(self, epoch: int) -> float:
        """0 -> experts train on their own modality only; 1 -> the gated mixture alone."""
        if self.curriculum_epochs <= 0:
            return 1.0
        return float(min(1.0, epoch / self.curriculum_epochs))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        weight = self.mixture_weight(self.current_epoch)
        self.loss.mixture_weight = weight
        self.moe_network.encoder.expert_heads_active = weight < 1
        self.print_to_log_file(f"mixture weight (expert curriculum): {weight:.3f}")

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        net = self.moe_network
        weights = {f"scale {s}": np.round(g.mean_weights.detach().cpu().numpy(), 3).tolist()
                   for s, g in enumerate(net.encoder.gates)}
        self.print_to_log_file(f"gate weights {net.expert_names} (last batch): {weights}")
