"""Optimiser parameter groups and the learning-rate schedule our trainers share."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from moe_nnunet.networks.swin import ExpertLayerNorm

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, ExpertLayerNorm)

__all__ = ["adamw_param_groups", "WarmupPolyLRScheduler"]


def adamw_param_groups(model: nn.Module, weight_decay: float,
                       no_decay_names: Sequence[str] = ("relative_position_bias_table",),
                       lr_factors: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices and conv kernels only; norms (whatever their shape: the experts' layer norms are (E, C)),
    biases and position-bias tables are not decayed.

    `lr_factors` maps a parameter-name fragment (e.g. "encoder.gates.") to a learning-rate factor; such
    parameters get groups of their own whose `lr_factor` `WarmupPolyLRScheduler` applies."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or id(p) in norm_params
                     or any(n in name for n in no_decay_names))
        factor = next((f for fragment, f in (lr_factors or {}).items() if fragment in name), 1.0)
        groups.setdefault((decay, factor), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_factor": factor}
            for (decay, factor), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up for `warmup_steps`, then nnU-Net's polynomial decay to 0 at `max_steps`.

    Like nnU-Net's `PolyLRScheduler`, `step(epoch)` sets the rate from the epoch alone, so a resumed
    training (`--c`) continues on the same curve without stored scheduler state.

    `lr_scale(step)`, if given, multiplies the rate (e.g. a lower rate for a fine-tuning phase); a param
    group's `lr_factor` (see `adamw_param_groups`) multiplies it for that group.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 exponent: float = 0.9, lr_scale: Callable[[int], float] | None = None) -> None:
        self.lr_scale = lr_scale
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            lr = self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        else:
            progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
            lr = self.initial_lr * max(0.0, 1 - progress) ** self.exponent
        return lr * self.lr_scale(step) if self.lr_scale is not None else lr

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
