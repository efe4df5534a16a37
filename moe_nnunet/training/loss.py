"""Plain-torch training pieces the trainers share: the MoE loss, AdamW parameter groups, warm-up schedule."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import _LRScheduler

from moe_nnunet.networks.swin import ExpertLayerNorm

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, ExpertLayerNorm)

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
    MoME's curriculum). In training the network returns a dict (`M4oEUNet.forward`): logits, router losses
    and the experts' own logits all reach the loss through the network's output, so DDP and torch.compile
    see one graph. In eval it returns plain logits, which get nnU-Net's loss alone.

    An expert learns only from the samples it is responsible for: `expert_mask` ((B, E) bool, set by the
    trainer for each batch; None = all) excludes the samples whose modality was dropped or, across
    datasets, the cases of other modalities.

    After each training call, `last_gate` holds the output's detached gate statistics ("gate_means",
    "gate_weights") for the trainer's gate report.

    Args:
        mixture_loss: nnU-Net's loss (deep-supervision wrapped or not) for the network output.
        expert_loss: loss for one full-resolution logit map (the unwrapped nnU-Net loss).
    """

    def __init__(self, mixture_loss: nn.Module, expert_loss: nn.Module) -> None:
        super().__init__()
        self.mixture_loss = mixture_loss
        self.expert_loss = expert_loss
        self.mixture_weight = 1.0
        self.expert_mask: torch.Tensor | None = None
        self.last_gate: dict[str, torch.Tensor] = {}

    def experts_term(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over experts of each expert's loss ((B, E, K, *S) logits) on the samples it is responsible for."""
        losses = []
        for e in range(expert_logits.shape[1]):
            logits = expert_logits[:, e]
            if self.expert_mask is None:
                losses.append(self.expert_loss(logits, target))
                continue
            rows = torch.nonzero(self.expert_mask[:, e].cpu()).flatten()  # on the host: no device sync
            if rows.numel():
                rows = rows.to(logits.device)
                losses.append(self.expert_loss(logits.index_select(0, rows), target.index_select(0, rows)))
        if not losses:  # no expert is responsible for any sample: a zero that keeps the heads in the graph
            return expert_logits.sum() * 0
        return sum(losses) / len(losses)

    def forward(self, output, target) -> torch.Tensor:
        if not isinstance(output, dict):
            return self.mixture_loss(output, target)
        self.last_gate = {"gate_means": output["gate_means"], "gate_weights": output["gate_weights"]}
        expert_logits = output["expert_logits"]
        full_res = target[0] if isinstance(target, (list, tuple)) else target
        if expert_logits is None or self.mixture_weight >= 1:
            loss = self.mixture_loss(output["logits"], target)
            if expert_logits is not None:  # heads computed but not weighted: keep them in the graph (DDP)
                loss = loss + expert_logits.sum() * 0
        elif self.mixture_weight <= 0:  # the experts alone; the mixture's logits stay in the graph (DDP)
            logits = output["logits"] if isinstance(output["logits"], (list, tuple)) else [output["logits"]]
            loss = self.experts_term(expert_logits, full_res) + sum(o.sum() for o in logits) * 0
        else:
            loss = (self.mixture_weight * self.mixture_loss(output["logits"], target)
                    + (1 - self.mixture_weight) * self.experts_term(expert_logits, full_res))
        return loss + output["aux_loss"]


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
