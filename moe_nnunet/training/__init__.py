"""Plain-torch training pieces the trainers share: the MoE loss (`loss`), AdamW parameter groups and the
warm-up schedule (`optim`), modality dropout (`modality_dropout`), DDP and torch.compile wrappers (`wrappers`),
and gate statistics (`gate_stats`)."""
from moe_nnunet.training.loss import MoETrainingLoss
from moe_nnunet.training.modality_dropout import sample_modality_dropout
from moe_nnunet.training.optim import WarmupPolyLRScheduler, adamw_param_groups
from moe_nnunet.training.wrappers import allow_unused_parameters, unwrapped

__all__ = ["MoETrainingLoss", "adamw_param_groups", "WarmupPolyLRScheduler", "sample_modality_dropout",
           "allow_unused_parameters", "unwrapped"]
