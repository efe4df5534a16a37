"""Plain-torch training pieces the trainers share: the MoE loss, AdamW parameter groups, warm-up schedule."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["MoETrainingLoss", "adamw_param_groups", "WarmupPolyLRScheduler"]


class MoETrainingLoss(nn.Module):
    """nnU-Net's segmentation loss on the mixture, plus the experts' own losses and the router losses.

    `loss = w * L(mixture) + (1 - w) * mean_e L(expert_e) + router losses`, where `mixture_weight` w is set by
    the trainer each epoch (0 -> experts learn their own modality, 1 -> the gated mixture alone;
    MoME's curriculum). Expert logits and router losses are read from the network after its forward pass,
    so the network's `forward` keeps returning logits only.

    Args:
        mixture_loss: nnU-Net's loss (deep-supervision wrapped or not) for the network output.
        expert_loss: loss for one full-resolution logit map (the unwrapped nnU-Net loss).
        network: the MoE network (not registered as a submodule); must offer `auxiliary_loss()` and
            `pop_expert_logits()`.
    """

    def __init__(self, mixture_loss: nn.Module, expert_loss: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.mixture_loss = mixture_loss
        self.expert_loss = expert_loss
        self._network = (network,)
        self.mixture_weight = 1.0

    def forward(self, output, target) -> torch.Tensor:
        net = self._network[0]
        loss = self.mixture_loss(output, target)
        if not net.training:
            return loss
        expert_logits = net.pop_expert_logits()
        if expert_logits and self.mixture_weight < 1:
            full_res = target[0] if isinstance(target, (list, tuple)) else target
            expert = sum(self.expert_loss(logits, full_res) for logits in expert_logits) / len(expert_logits)
            loss = self.mixture_weight * loss + (1 - self.mixture_weight) * expert
        return loss + net.auxiliary_loss()


def adamw_param_groups(model: nn.Module, weight_decay: float,
                       no_decay_names: Sequence[str] = ("relative_position_bias_table",)) -> list[dict]:
    """Decay matrices and conv kernels only; norms, biases and position-bias tables are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(n in name for n in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up for `warmup_steps`, then nnU-Net's polynomial decay to 0 at `max_steps`.

    Like nnU-Net's `PolyLRScheduler`, `step(epoch)` sets the rate from the epoch alone, so a resumed
    training (`--c`) continues on the same curve without stored scheduler state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 exponent: float = 0.9) -> None:
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.initial_lr * max(0.0, 1 - progress) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)
