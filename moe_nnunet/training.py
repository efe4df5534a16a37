"""Plain-torch training pieces the trainers share: the MoE loss, AdamW parameter groups, warm-up schedule."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["MoETrainingLoss", "adamw_param_groups", "WarmupPolyLRScheduler", "sample_modality_dropout",
           "allow_unused_parameters"]


def sample_modality_dropout(batch_size: int, num_modalities: int, p: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Which modalities each sample keeps: (B, M) bool, never all False.

    With probability `p` a sample loses a uniformly drawn non-empty proper subset of its modalities (each of
    the 2^M - 2 subsets equally likely), so at least one modality always stays; otherwise it keeps all.
    With one modality nothing is dropped. (Modality dropout: Neverova et al., "ModDrop", TPAMI 2016.)
    """
    keep = torch.ones(batch_size, num_modalities, dtype=torch.bool)
    if num_modalities < 2 or p <= 0:
        return keep
    drop = torch.rand(batch_size, generator=generator) < p
    n = int(drop.sum())
    if n:
        # a random integer in [1, 2^M - 2] read as a bit mask of the dropped modalities
        codes = torch.randint(1, 2 ** num_modalities - 1, (n,), generator=generator)
        bits = (codes.view(-1, 1) >> torch.arange(num_modalities)) & 1
        keep[drop] = bits == 0
    return keep


class MoETrainingLoss(nn.Module):
    """nnU-Net's segmentation loss on the mixture, plus the experts' own losses and the router losses.

    `loss = w * L(mixture) + (1 - w) * mean_e L(expert_e) + router losses`, where `mixture_weight` w is set by
    the trainer each epoch (0 -> experts learn their own modality, 1 -> the gated mixture alone;
    MoME's curriculum). Expert logits and router losses are read from the network after its forward pass,
    so the network's `forward` keeps returning logits only.

    An expert learns only from the samples it is responsible for: `expert_mask` ((B, E) bool, set by the
    trainer for each batch; None = all) excludes the samples whose modality was dropped or, across
    datasets, the cases of other modalities.

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
        self.expert_mask: torch.Tensor | None = None

    def experts_term(self, expert_logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Mean over experts of each expert's loss on the samples it is responsible for."""
        losses = []
        for e, logits in enumerate(expert_logits):
            if self.expert_mask is None:
                losses.append(self.expert_loss(logits, target))
                continue
            rows = torch.nonzero(self.expert_mask[:, e].cpu()).flatten()  # on the host: no device sync
            if rows.numel():
                rows = rows.to(logits.device)
                losses.append(self.expert_loss(logits.index_select(0, rows), target.index_select(0, rows)))
        if not losses:
            return torch.zeros((), device=target.device)
        return sum(losses) / len(losses)

    def forward(self, output, target) -> torch.Tensor:
        net = self._network[0]
        if not net.training:
            return self.mixture_loss(output, target)
        expert_logits = net.pop_expert_logits()
        full_res = target[0] if isinstance(target, (list, tuple)) else target
        if self.mixture_weight >= 1 or not expert_logits:
            loss = self.mixture_loss(output, target)
        elif self.mixture_weight <= 0:  # the experts alone (two-stage training, stage 1)
            loss = self.experts_term(expert_logits, full_res)
        else:
            loss = (self.mixture_weight * self.mixture_loss(output, target)
                    + (1 - self.mixture_weight) * self.experts_term(expert_logits, full_res))
        return loss + net.auxiliary_loss()


def adamw_param_groups(model: nn.Module, weight_decay: float,
                       no_decay_names: Sequence[str] = ("relative_position_bias_table",),
                       lr_factors: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices and conv kernels only; norms, biases and position-bias tables are not decayed.

    `lr_factors` maps a parameter-name fragment (e.g. "encoder.gates.") to a learning-rate factor; such
    parameters get groups of their own whose `lr_factor` `WarmupPolyLRScheduler` applies."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or any(n in name for n in no_decay_names))
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


def unwrapped(network: nn.Module) -> nn.Module:
    """The network a trainer holds, without its DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    module = network.module if isinstance(network, DDP) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def allow_unused_parameters(network: DDP) -> DDP:
    """The DDP-wrapped module re-wrapped with `find_unused_parameters=True` (unchanged if it already is).

    DDP by default waits for a gradient of every parameter in every step and fails in the next step when
    one got none. An MoE network leaves some out by design: the experts' light heads after the curriculum,
    the heads of experts that have no sample of their modality in a rank's batch, the gates in stage 1 of
    the two-stage training. The replaced wrapper's reducer is released with it."""
    if network.find_unused_parameters:
        return network
    return DDP(network.module, device_ids=network.device_ids, output_device=network.output_device,
               find_unused_parameters=True)
