"""Plain-torch training pieces the trainers share: the MoE loss, AdamW parameter groups, warm-up schedule
(`loss`), and gate statistics (`gate_stats`)."""
from moe_nnunet.training.loss import (MoETrainingLoss, WarmupPolyLRScheduler, adamw_param_groups,
                                      allow_unused_parameters, sample_modality_dropout, unwrapped)

__all__ = ["MoETrainingLoss", "adamw_param_groups", "WarmupPolyLRScheduler", "sample_modality_dropout",
           "allow_unused_parameters", "unwrapped"]
