"""Per-token gating over modality experts, with the router losses of sparse MoE training.

Axes legend used in shapes below:
    B batch, E experts, C channels per expert, S... spatial axes (2 or 3), T tokens (= prod(S)).

References:
    Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017.
    Fedus et al., "Switch Transformers", JMLR 2022 (load-balancing loss).
    Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", 2022 (router z-loss).
    Jiang et al., "M4oE: A Foundation Model for Medical Multimodal Image Segmentation with Mixture of Experts",
    MICCAI 2024 (gated fusion of modality-specific Swin experts).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_nnunet.networks.selection import clone_module, expert_blocks, narrow_parameter

__all__ = ["FUSIONS", "switch_balance_loss", "router_z_loss", "routing_loss", "ExpertGate"]

# how a gate fuses the experts' features: their weighted sum (C channels, as in M4oE), or the weighted experts
# side by side (E*C channels), each scaled by its weight times the number of experts present
FUSIONS = ("sum", "concat")


def switch_balance_loss(probs: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, `E * sum_e f_e * P_e`, equal to 1 for a perfectly even gate.

    Args:
        probs: (B, E, *S) gate probabilities (float32).
        present: optional (B, E) bool mask of experts that were available; E counts the available ones.
    Returns:
        scalar tensor
    """
    num_experts = probs.shape[1]
    flat = probs.movedim(1, -1).reshape(-1, num_experts)  # (B*T, E)
    mean_prob = flat.mean(0)  # P_e
    dispatch = F.one_hot(flat.argmax(-1), num_experts).to(flat.dtype).mean(0)  # f_e
    n_available = present.sum(1).to(flat.dtype).mean() if present is not None else float(num_experts)
    return n_available * (dispatch * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits (B, E, *S); keeps logits small."""
    return torch.logsumexp(logits, dim=1).square().mean()


def routing_loss(logits: torch.Tensor, route_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every token's gate logits (B, E, *S) against its sample's expert (B,) long; samples
    with target -1 are left out (0 when none is known, never NaN)."""
    target = route_target.view((-1,) + (1,) * (logits.ndim - 2)).expand(logits.shape[:1] + logits.shape[2:])
    total = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
    return total / (target >= 0).sum().clamp(min=1)


class ExpertGate(nn.Module):
    """Gate of one scale: looks at every expert's features and gives each token softmax weights over experts.

    The router is a two-layer point-wise MLP (1x1 convolutions) over the experts' features, which arrive
    side by side as (B, E*C, *S); it runs in the autocast precision, its logits and everything after them in
    float32. Absent experts (`present` False) have their features zeroed, so what the router sees does not
    depend on what an absent expert made of an empty channel, and get exactly zero weight because their
    logits are set to -inf before the softmax. With `top_k`, each token keeps its k largest weights,
    renormalised to sum to one.

    `router_losses` gives the weighted balance and z-losses and, when the trainer knows which expert should
    serve a sample (datasets combined across modalities, one tag per case), the routing loss: the
    cross-entropy of every token's gate logits against the sample's expert, so the gate learns to recognise
    the modality from the image and needs no tag at inference. (A supervised router, as in task- or
    domain-routed MoE; the M4oE paper leaves the gate unsupervised, which on small data leaves it near an
    even split.)

    Args:
        channels: feature channels of each expert at this scale (C).
        num_experts: E.
        conv_op: `nn.Conv2d` or `nn.Conv3d`.
        hidden: router hidden width.
        top_k: keep the k largest weights per token; None for a dense soft gate.
        balance_loss_weight: weight of `switch_balance_loss`.
        z_loss_weight: weight of `router_z_loss`.
        fusion: "sum" (the weighted sum of the experts' features, as in M4oE) or "concat" (the weighted
            experts' features side by side, for a 1x1 convolution after the gate to combine; labels that need
            two modalities at once then reach the decoder as both modalities' features, not their average).
    """

    def __init__(self, channels: int, num_experts: int, conv_op: type[nn.Module], hidden: int = 32,
                 top_k: int | None = None, balance_loss_weight: float = 1e-2, z_loss_weight: float = 1e-3,
                 fusion: str = "sum") -> None:
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"gate_top_k={top_k} must lie in [1, {num_experts}] (the number of experts), "
                             f"or be None for a soft gate.")
        if fusion not in FUSIONS:
            raise ValueError(f"gate_fusion={fusion!r}: choose one of {', '.join(FUSIONS)}.")
        self.num_experts = num_experts
        self.fusion = fusion
        self.top_k = top_k
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.hidden = conv_op(channels * num_experts, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.logits = conv_op(hidden, num_experts, kernel_size=1)

    def select_experts(self, indices: Sequence[int]) -> ExpertGate:
        """The gate over the experts `indices` only, equal to this gate with the other experts absent: their
        (zeroed) features add nothing to the router's hidden layer, and their logits are left out instead of
        being set to -inf."""
        hidden, logits, k = self.hidden, self.logits, len(indices)
        columns = expert_blocks(indices, hidden.in_channels // self.num_experts)
        rows = torch.as_tensor(list(indices))
        return clone_module(
            self, num_experts=k, top_k=None if self.top_k is None else min(self.top_k, k),
            hidden=clone_module(hidden, weight=narrow_parameter(hidden.weight, 1, columns),
                                in_channels=len(columns)),
            logits=clone_module(logits, weight=narrow_parameter(logits.weight, 0, rows),
                                bias=narrow_parameter(logits.bias, 0, rows), out_channels=k))

    def reset_router(self) -> None:
        """Start from an even gate: zero output layer, so every expert gets weight 1/E."""
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, features: torch.Tensor, present: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            features: (B, E*C, *S) the experts' features side by side.
            present: optional (B, E) bool, False for experts whose modality is missing.
        Returns:
            `(fused, weights, logits)`: the fused features, (B, C, *S) (`fusion` "sum": the gated sum) or
            (B, E*C, *S) ("concat": each expert's features times its weight and the number of experts present),
            (B, E, *S) float32 gate weights, (B, E, *S) float32 router logits (-inf for absent experts).
        """
        b, ec, *spatial = features.shape
        per_expert = features.view(b, self.num_experts, ec // self.num_experts, *spatial)  # (B, E, C, *S)
        if present is not None:
            present_view = present.view(b, self.num_experts, *(1,) * len(spatial))
            per_expert = per_expert * present_view.unsqueeze(2).to(features.dtype)
            features = per_expert.view(features.shape)
        logits = self.logits(self.act(self.hidden(features))).float()  # (B, E, *S)
        with torch.autocast(device_type=features.device.type, enabled=False):
            if present is not None:
                logits = logits.masked_fill(~present_view, float("-inf"))
            weights = torch.softmax(logits, dim=1)
            if self.top_k is not None and self.top_k < self.num_experts:
                kth = weights.topk(self.top_k, dim=1).values[:, -1:]
                weights = weights * (weights >= kth)
                weights = weights / weights.sum(1, keepdim=True)
        weighted = weights.to(features.dtype).unsqueeze(2) * per_expert  # (B, E, C, *S)
        if self.fusion == "sum":
            return weighted.sum(1), weights, logits
        # concat: an even gate leaves every present expert's features as they are, however many are present
        n_present = float(self.num_experts) if present is None else \
            present.sum(1).to(features.dtype).view(b, 1, 1, *(1,) * len(spatial))
        return (weighted * n_present).view(features.shape), weights, logits

    def router_losses(self, logits: torch.Tensor, present: torch.Tensor | None = None,
                      route_target: torch.Tensor | None = None, route_weight: float = 0.0) -> torch.Tensor:
        """Weighted balance + z-loss (+ routing loss when `route_target` (B,) long is given) of one forward."""
        probs = torch.softmax(logits, dim=1)
        # logsumexp ignores the -inf of absent experts, so the z-loss needs no special case
        loss = (self.balance_loss_weight * switch_balance_loss(probs, present)
                + self.z_loss_weight * router_z_loss(logits))
        if route_target is not None and route_weight > 0:
            loss = loss + route_weight * routing_loss(logits, route_target)
        return loss
