"""M4oE's two-stage training as two nnU-Net trainers chained by `-pretrained_weights`.

Stage 1 (`nnUNetTrainerM4oEExperts`) trains every expert on its own modality; stage 2
(`nnUNetTrainerM4oEGate`) starts from stage 1's checkpoint, trains gate and decoder with the experts
frozen, then everything at a lower learning rate. Reference: Jiang et al., "M4oE: A Foundation Model for
Medical Multimodal Image Segmentation with Mixture of Experts", MICCAI 2024 (experts pre-trained per
modality, then the gated fusion).

    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerM4oEExperts -p nnUNetM4oEPlans
    nnUNetv2_train D 3d_fullres F -tr nnUNetTrainerM4oEGate -p nnUNetM4oEPlans \\
        -pretrained_weights $nnUNet_results/<dataset>/nnUNetTrainerM4oEExperts__nnUNetM4oEPlans__3d_fullres/fold_F/checkpoint_final.pth
"""
from __future__ import annotations

import torch

from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE

__all__ = ["nnUNetTrainerM4oEExperts", "nnUNetTrainerM4oEGate"]


class nnUNetTrainerM4oEExperts(nnUNetTrainerM4oE):
    """Stage 1: each expert learns its own modality.

    Every training sample is routed to ONE expert: with several channels, one modality drawn at random
    per sample (the others are masked, so the gate gives that expert weight 1); for a dataset combined
    across modalities (`moe_nnunet combine`), the expert of the case's modality tag. The loss is half
    nnU-Net's loss on the routed network output (that expert through the shared decoder) and half the loss
    of the expert's own light head. The gate is not trained here (stage 2 does it); validation runs all
    experts through the still-even gate, so its pseudo Dice is that of the experts' average.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.expert_loss_share = 0.5

    def mixture_weight(self, epoch: int) -> float:
        return 1.0 - self.expert_loss_share

    def kept_modalities(self, batch_size: int, num_channels: int) -> torch.Tensor:
        keep = torch.zeros(batch_size, num_channels, dtype=torch.bool)
        keep[torch.arange(batch_size), torch.randint(0, num_channels, (batch_size,))] = True
        return keep

    def experts_for_batch(self, keep: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor]:
        present, responsible = super().experts_for_batch(keep, keys)
        return responsible, responsible  # across datasets: only the case's own expert

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.moe_network.expert_heads_active = True


class nnUNetTrainerM4oEGate(nnUNetTrainerM4oE):
    """Stage 2: start from stage 1 (`-pretrained_weights`), train gate and decoder with the experts frozen
    for the first `frozen_fraction` of the epochs, then everything at `finetune_lr_factor` times the rate.

    Modality dropout stays on (the gate learns to do without a modality); no expert curriculum (the
    experts were trained in stage 1). nnU-Net does not transfer the decoder's final 1x1 layers
    (`seg_layers`) with `-pretrained_weights`; they restart here. A training started without
    `-pretrained_weights` is refused unless it resumes (`--c`), since the frozen experts would be random.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.curriculum_epochs = 0
        self.warmup_epochs = 2
        self.frozen_fraction = 0.5
        self.finetune_lr_factor = 0.1
        self._initial_expert_signature: float | None = None

    @property
    def frozen_epochs(self) -> int:
        return int(round(self.frozen_fraction * self.num_epochs))

    def lr_scale(self, epoch: int) -> float:
        return 1.0 if epoch < self.frozen_epochs else self.finetune_lr_factor

    def set_experts_frozen(self, frozen: bool) -> None:
        for module in (self.moe_network.encoder.experts, self.moe_network.encoder.heads):
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def _expert_signature(self) -> float:
        return float(sum(p.detach().double().abs().sum() for p in self.moe_network.encoder.experts.parameters()))

    def initialize(self):
        super().initialize()
        self._initial_expert_signature = self._expert_signature()

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0 and self._expert_signature() == self._initial_expert_signature:
            raise RuntimeError(
                "nnUNetTrainerM4oEGate is stage 2 of the two-stage training and needs the experts of stage 1: "
                "add -pretrained_weights <nnUNet_results>/<dataset>/nnUNetTrainerM4oEExperts__<plans>__<config>/"
                "fold_<F>/checkpoint_final.pth (train stage 1 with -tr nnUNetTrainerM4oEExperts first).")
        super().on_train_start()

    def on_train_epoch_start(self):
        frozen = self.current_epoch < self.frozen_epochs
        self.set_experts_frozen(frozen)
        super().on_train_epoch_start()
        self.print_to_log_file(f"experts {'frozen' if frozen else 'trained'} "
                               f"(learning-rate factor {self.lr_scale(self.current_epoch)})")
