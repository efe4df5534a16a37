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

__all__ = ["switch_balance_loss", "router_z_loss", "ExpertGate"]


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


class ExpertGate(nn.Module):
    """Gate of one scale: looks at every expert's features and gives each token softmax weights over experts.

    The router is a two-layer point-wise MLP (1x1 convolutions) over the concatenated expert features,
    evaluated in float32 whatever the autocast state. Absent experts (`present` False) are zeroed in the
    router's input, so what the router sees does not depend on what an absent expert made of an empty
    channel, and get exactly zero weight because their logits are set to -inf before the softmax. With
    `top_k`, each token keeps its k largest weights, renormalised to sum to one.

    While training, the module keeps `aux_loss` (balance + z-loss, weighted) for the trainer to add to
    its loss (0 in eval). When the trainer knows which expert should serve a sample (datasets combined
    across modalities, one tag per case), it sets `route_target` (B,) long (-1: unknown; at least one known,
    which the trainer checks on the host) and `route_weight`:
    `aux_loss` then also holds the routing loss, the cross-entropy of every token's gate logits against the
    sample's expert, so the gate learns to recognise the modality from the image and needs no tag at
    inference. (A supervised router, as in task- or domain-routed MoE; the M4oE paper leaves the gate
    unsupervised, which on small data leaves it near an even split.) After every forward pass,
    `mean_weights` (E,) holds the detached average gate weight over batch and tokens, and `weights` the
    detached (B, E, *S) map when `keep_weights` is set.

    Args:
        channels: feature channels of each expert at this scale (C).
        num_experts: E.
        conv_op: `nn.Conv2d` or `nn.Conv3d`.
        hidden: router hidden width.
        top_k: keep the k largest weights per token; None for a dense soft gate.
        balance_loss_weight: weight of `switch_balance_loss`.
        z_loss_weight: weight of `router_z_loss`.
    """

    def __init__(self, channels: int, num_experts: int, conv_op: type[nn.Module], hidden: int = 32,
                 top_k: int | None = None, balance_loss_weight: float = 1e-2, z_loss_weight: float = 1e-3
                 ) -> None:
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"gate_top_k={top_k} must lie in [1, {num_experts}] (the number of experts), "
                             f"or be None for a soft gate.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.hidden = conv_op(channels * num_experts, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.logits = conv_op(hidden, num_experts, kernel_size=1)
        self.aux_loss = torch.zeros(())
        self.mean_weights = torch.zeros(num_experts)
        self.keep_weights = False
        self.weights: torch.Tensor | None = None
        self.route_target: torch.Tensor | None = None
        self.route_weight = 0.0

    def reset_router(self) -> None:
        """Start from an even gate: zero output layer, so every expert gets weight 1/E."""
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, features: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            features: E tensors of shape (B, C, *S).
            present: optional (B, E) bool, False for experts whose modality is missing.
        Returns:
            (B, C, *S) gated sum of the expert features.
        """
        present_view = None
        if present is not None:
            present_view = present.view(present.shape + (1,) * (features[0].ndim - 2))
        # the router's first layer is one 1x1 convolution over the experts' concatenated features, applied
        # as a sum of per-expert slices of its weight: the (B, E*C, *S) concatenation is never made
        conv = F.conv3d if features[0].ndim == 5 else F.conv2d
        width = features[0].shape[1]
        hidden = None
        for e, f in enumerate(features):
            term = conv(f, self.hidden.weight[:, e * width:(e + 1) * width])
            if present_view is not None:
                term = term * present_view[:, e:e + 1].to(term.dtype)
            hidden = term if hidden is None else hidden + term
        if self.hidden.bias is not None:
            hidden = hidden + self.hidden.bias.view(1, -1, *(1,) * (hidden.ndim - 2)).to(hidden.dtype)
        # router in the autocast precision, gate logits and everything after them in float32
        logits = self.logits(self.act(hidden)).float()  # (B, E, *S)
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            if present is not None:
                logits = logits.masked_fill(~present_view, float("-inf"))
            probs = torch.softmax(logits, dim=1)
            weights = probs
            if self.top_k is not None and self.top_k < self.num_experts:
                kth = probs.topk(self.top_k, dim=1).values[:, -1:]
                weights = probs * (probs >= kth)
                weights = weights / weights.sum(1, keepdim=True)
        if self.training:
            # logsumexp ignores the -inf of absent experts, so the z-loss needs no special case
            self.aux_loss = (self.balance_loss_weight * switch_balance_loss(probs, present)
                             + self.z_loss_weight * router_z_loss(logits))
            if self.route_target is not None and self.route_weight > 0:
                target = self.route_target.view((-1,) + (1,) * (logits.ndim - 2)).expand(
                    logits.shape[:1] + logits.shape[2:])
                self.aux_loss = self.aux_loss + self.route_weight * F.cross_entropy(logits, target,
                                                                                    ignore_index=-1)
        else:
            self.aux_loss = torch.zeros((), device=logits.device)
        self.mean_weights = weights.detach().mean(dim=[0, *range(2, weights.ndim)])  # (E,), no copy
        self.weights = weights.detach() if self.keep_weights else None
        w = weights.to(features[0].dtype)
        fused = w[:, 0:1] * features[0]
        for e in range(1, self.num_experts):
            fused = fused + w[:, e:e + 1] * features[e]
        return fused
