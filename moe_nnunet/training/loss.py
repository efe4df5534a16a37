"""The MoE training loss: nnU-Net's loss on the gated mixture, the experts' own losses and the router losses."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MoETrainingLoss"]


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
