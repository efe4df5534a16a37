"""Trained segmentation models, frozen, merged into one by a small trainable per-label gate.

SAM-Med3D-MoE's idea in nnU-Net: a general model and task-specific models fine-tuned from it each stay exactly
as they were trained; only a gate learns, per case, per voxel and per label, which of them to trust, so the
merged model forgets nothing any of them knew. Wang et al., "SAM-Med3D-MoE: Towards a Non-Forgetting Segment
Anything Model via Mixture of Experts for 3D Medical Image Segmentation", MICCAI 2024.

Axes legend used in the shapes below:
    B batch, C image channels, K_e labels of expert e, L labels of the union (the merged model's outputs),
    E experts, S... spatial axes (2 or 3).

Plain torch: experts are rebuilt from their plans entries with `pydoc.locate` (`build_expert`), as nnU-Net's
`get_network_from_plans` does, so this module never imports nnunetv2. `moe_nnunet merge` writes the plans.
"""
from __future__ import annotations

import math
import pydoc
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

__all__ = ["MERGED_NETWORK_CLASS", "SELECTIONS", "build_expert", "map_labels_by_name", "LabelGate",
           "MergedExpertsNet", "MergedOutput"]

MERGED_NETWORK_CLASS = "moe_nnunet.networks.merged.MergedExpertsNet"
SELECTIONS = ("soft", "topk", "threshold")
_EPS = 1e-6


def build_expert(spec: Mapping) -> nn.Module:
    """One expert network from its plans entries, built as nnU-Net's `get_network_from_plans` builds it (no
    weight initialisation: the weights come from the expert's checkpoint).

    Args:
        spec: `network_class_name` (dotted path), `arch_kwargs`, `arch_kwargs_requires_import` (keys of
            `arch_kwargs` holding dotted class names), `input_channels`, `num_classes`.
    """
    cls = pydoc.locate(spec["network_class_name"])
    if cls is None:
        raise ValueError(f"expert network class {spec['network_class_name']} cannot be imported; install the "
                         f"package that defines it (the one the expert was trained with).")
    kwargs = dict(spec["arch_kwargs"])
    for key in spec.get("arch_kwargs_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    return cls(input_channels=int(spec["input_channels"]), num_classes=int(spec["num_classes"]),
               deep_supervision=False, **kwargs)


def map_labels_by_name(expert_labels: Mapping[str, int], union_labels: Mapping[str, int]) -> list[int]:
    """The union output channel of each output channel of an expert, matched by label name.

    Args:
        expert_labels, union_labels: dataset.json `labels` (name -> value; background is value 0 whatever its
            name, an `ignore` label has no output channel).
    Returns:
        `out` with `out[k]` = union channel of the expert's channel k (k = its label value).
    """
    def channels(labels: Mapping[str, int], what: str) -> dict[int, str]:
        named = {}
        for name, value in labels.items():
            if name == "ignore":
                continue
            if not isinstance(value, int):
                raise ValueError(f"{what} label {name!r} is a region ({value}); merging supports label maps only.")
            named[value] = name
        if sorted(named) != list(range(len(named))):
            raise ValueError(f"{what} labels {dict(labels)} must have the consecutive values 0..K-1 (nnU-Net's rule).")
        return named

    expert, union = channels(expert_labels, "expert"), channels(union_labels, "union")
    by_name = {name: value for value, name in union.items()}
    missing = [name for value, name in expert.items() if value and name not in by_name]
    if missing:
        raise ValueError(f"the union labels {list(by_name)} lack the expert's labels {missing}; the merged "
                         f"dataset must contain every label of every expert (matched by name).")
    return [0 if value == 0 else by_name[expert[value]] for value in range(len(expert))]


class LabelGate(nn.Module):
    """Per-voxel, per-label expert logits from the image and the experts' probabilities.

    Two 3x3 convolutions, then two heads whose sum is the logit of expert e for label l at each voxel: a 1x1
    convolution (the voxel's own evidence) and a linear layer on the features averaged over the patch (the
    case's context). Both heads start at zero, so the gate starts with even weights.

    Args:
        in_channels: C + sum_e K_e.
        num_labels: L.
        num_experts: E.
        hidden: width of the two convolutions.
        conv_op: `nn.Conv2d` or `nn.Conv3d`.
    """

    def __init__(self, in_channels: int, num_labels: int, num_experts: int, hidden: int,
                 conv_op: type[nn.Module]) -> None:
        super().__init__()
        self.num_labels, self.num_experts = num_labels, num_experts
        self.body = nn.Sequential(conv_op(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.01, inplace=True),
                                  conv_op(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.01, inplace=True))
        self.voxel_head = conv_op(hidden, num_labels * num_experts, 1)
        self.case_head = nn.Linear(hidden, num_labels * num_experts)
        for head in (self.voxel_head, self.case_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) -> logits (B, L, E, *S)."""
        h = self.body(x)                                                  # (B, hidden, *S)
        spatial = tuple(range(2, h.ndim))
        case = self.case_head(h.mean(spatial)).view(h.shape[0], -1, *(1,) * len(spatial))  # (B, L*E, 1...)
        logits = self.voxel_head(h) + case                                # (B, L*E, *S)
        return logits.view(h.shape[0], self.num_labels, self.num_experts, *h.shape[2:])


class MergedOutput(NamedTuple):
    """What `MergedExpertsNet` returns in training (in eval it returns the logits alone, as nnU-Net expects)."""
    logits: torch.Tensor        # (B, L, *S) log merged probabilities
    gate_weights: torch.Tensor  # (L, E) this batch's mean selected weight per label and expert, detached


class MergedExpertsNet(nn.Module):
    """Frozen expert segmentation networks joined by a trainable per-label gate (SAM-Med3D-MoE in nnU-Net).

    Each expert segments the input with its own architecture and trained weights (never updated: no gradient,
    always in eval mode). Expert e predicts K_e labels, which `output_labels` places among the L labels of the
    union. For every label l of the union, the gate gives softmax weights over the experts that predict l, and
    the merged probability is `q_l = sum_e w[l, e] * p_e[l]`, renormalised over the labels; the network returns
    log q, valid logits (softmax gives q back). With one expert, q is that expert's output. In training the
    network returns a `MergedOutput` (the logits and the batch's mean gate weights, which the trainer's loss
    unpacks and logs), so that nothing is kept on the module during `forward` (no recompiling under
    `torch.compile`).

    Background is predicted by every expert, but an expert that predicts only some labels means by background
    "none of MY labels". Its background counts only for the share that the general model (`general_expert`,
    the first model given to `moe_nnunet merge`) also calls background among the labels the expert does not
    know: `p_e[0] * p_g[0] / (p_g[0] + sum of p_g over those labels)`. So a specialist can claim its label
    where the general model saw background, and leaves the general model's other labels alone.

    Selection of the experts per label and voxel (`selection`):
      * "soft": the gate's weights as they are;
      * "topk": the `top_k` largest weights, renormalised;
      * "threshold" (after SAM-Med3D-MoE's confidence threshold): the top expert alone when its weight
        reaches `threshold`, else the general model when it predicts the label.
    The hard selections train with the soft weights' gradient (straight-through estimator).

    Reference: Wang et al., "SAM-Med3D-MoE: Towards a Non-Forgetting Segment Anything Model via Mixture of
    Experts for 3D Medical Image Segmentation", MICCAI 2024.

    Args:
        input_channels: image channels C (every expert reads all of them).
        num_classes: L, the union labels (background included).
        experts: per expert, the `build_expert` entries plus `output_labels` (union channel of each of its K_e
            channels, see `map_labels_by_name`) and optionally `name`.
        conv_op: `nn.Conv2d` or `nn.Conv3d` for the gate.
        gate_hidden: width of the gate's convolutions.
        selection: one of `SELECTIONS`.
        top_k: experts kept per label and voxel by "topk".
        threshold: confidence the top expert needs under "threshold".
        general_expert: index of the general model.
        deep_supervision: must be False (the experts' outputs have no common scales).
    """

    def __init__(self, input_channels: int, num_classes: int, experts: Sequence[Mapping],
                 conv_op: type[nn.Module], gate_hidden: int = 16, selection: str = "soft", top_k: int = 1,
                 threshold: float = 0.5, general_expert: int = 0, deep_supervision: bool = False) -> None:
        super().__init__()
        if deep_supervision:
            raise ValueError("the merged network has no deep supervision: train it with nnUNetTrainerMoEMerge "
                             "(-tr nnUNetTrainerMoEMerge), which switches it off.")
        if len(experts) < 1:
            raise ValueError("give at least one expert.")
        if selection not in SELECTIONS:
            raise ValueError(f"selection {selection!r} is unknown; choose one of {SELECTIONS}.")
        if top_k < 1 or not 0 < threshold <= 1 or not 0 <= general_expert < len(experts):
            raise ValueError(f"need top_k >= 1, 0 < threshold <= 1 and 0 <= general_expert < {len(experts)}; "
                             f"got {top_k}, {threshold}, {general_expert}.")
        labels = [list(map(int, spec["output_labels"])) for spec in experts]
        available = torch.zeros(num_classes, len(experts), dtype=torch.bool)    # (L, E)
        for e, (spec, own) in enumerate(zip(experts, labels)):
            if len(own) != int(spec["num_classes"]) or own[0] != 0 or \
                    not all(0 < c < num_classes for c in own[1:]) or len(set(own)) != len(own):
                raise ValueError(f"expert {e}: output_labels {own} must map its {spec['num_classes']} channels "
                                 f"(background first, to 0) to distinct union channels in [1, {num_classes}).")
            available[own, e] = True
        if not available.any(1).all():
            orphans = [c for c in range(num_classes) if not available[c].any()]
            raise ValueError(f"no expert predicts the union channels {orphans}; every label needs an expert.")
        self.expert_names = [str(spec.get("name", f"expert_{e}")) for e, spec in enumerate(experts)]
        self.experts = nn.ModuleList(build_expert(spec) for spec in experts)
        self.experts.requires_grad_(False)
        self.experts.eval()
        self.general = general_expert
        self.register_buffer("available", available, persistent=False)
        fallback = torch.where(available[:, general_expert], general_expert, -1)   # (L,), -1: no fallback
        self.register_buffer("fallback", fallback, persistent=False)
        # unknown[e, k]: the general model's channel k is a foreground label expert e does not predict
        unknown = torch.tensor([[float(k > 0 and c not in own) for k, c in enumerate(labels[general_expert])]
                                for own in labels])                                   # (E, K_g)
        self.register_buffer("unknown", unknown, persistent=False)
        # the experts' foreground channels, concatenated, and their places in the flattened (L - 1, E) grid
        offsets = [sum(len(own) for own in labels[:e]) for e in range(len(labels))]
        source = [offsets[e] + k for e, own in enumerate(labels) for k in range(1, len(own))]
        target = [(c - 1) * len(labels) + e for e, own in enumerate(labels) for c in own[1:]]
        self.register_buffer("source", torch.tensor(source), persistent=False)
        self.register_buffer("target", torch.tensor(target), persistent=False)
        self.selection, self.top_k, self.threshold = selection, int(top_k), float(threshold)
        num_probabilities = sum(len(own) for own in labels)
        self.gate = LabelGate(input_channels + num_probabilities, num_classes, len(experts), gate_hidden, conv_op)

    def train(self, mode: bool = True) -> "MergedExpertsNet":
        super().train(mode)
        self.experts.eval()  # frozen: dropout off and normalisation statistics fixed, in training too
        return self

    def expert_probabilities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's softmax output (B, K_e, *S), float32, without gradient."""
        with torch.no_grad():
            return [torch.softmax(expert(x).float(), 1) for expert in self.experts]

    def gate_weights(self, x: torch.Tensor, probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
        """Selected expert weights (B, L, E, *S); 0 for experts that do not predict a label."""
        logits = self.gate(torch.cat([x.float(), *probabilities], 1))                # (B, L, E, *S)
        mask = self.available.view(1, *self.available.shape, *(1,) * (x.ndim - 2))
        soft = torch.softmax(logits.masked_fill(~mask, float("-inf")), 2)
        if self.selection == "soft":
            return soft
        if self.selection == "topk":
            kth = soft.topk(min(self.top_k, soft.shape[2]), dim=2).values[:, :, -1:]   # (B, L, 1, *S)
            kept = soft * (soft >= kth)
            hard = kept / kept.sum(2, keepdim=True)
        else:
            confidence, top = soft.max(2, keepdim=True)                                 # (B, L, 1, *S)
            fallback = self.fallback.view(1, -1, 1, *(1,) * (x.ndim - 2)).expand_as(top)
            choice = torch.where((confidence >= self.threshold) | (fallback < 0), top, fallback)
            hard = torch.zeros_like(soft).scatter_(2, choice, 1.0)
        return hard.detach() + soft - soft.detach()  # forward: the selection; backward: the soft weights

    def union_probabilities(self, probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, L, E, *S): expert e's probability of union label l (0 where it does not predict l); of its
        background only the share the general model also calls background (see the class docstring)."""
        general = probabilities[self.general]                                           # (B, K_g, *S)
        elsewhere = torch.einsum("ek,bk...->be...", self.unknown, general)             # (B, E, *S)
        share = general[:, :1] / (general[:, :1] + elsewhere).clamp_min(_EPS)          # (B, E, *S)
        background = torch.stack([p[:, 0] for p in probabilities], 1) * share           # (B, E, *S)
        foreground = torch.cat(list(probabilities), 1).index_select(1, self.source)     # (B, sum_e (K_e-1), *S)
        b, spatial = background.shape[0], background.shape[2:]
        grid = foreground.new_zeros(b, (self.available.shape[0] - 1) * self.available.shape[1], *spatial)
        grid = grid.index_copy(1, self.target, foreground)
        return torch.cat([background.unsqueeze(1), grid.view(b, -1, self.available.shape[1], *spatial)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | MergedOutput:
        """(B, C, *S) -> log merged probabilities (B, L, *S), usable as logits; in training a `MergedOutput`
        holding them and the batch's mean gate weights (L, E)."""
        probabilities = self.expert_probabilities(x)
        with torch.autocast(x.device.type, enabled=False):  # the gate and the mixture in float32
            weights = self.gate_weights(x, probabilities)                               # (B, L, E, *S)
            merged = (weights * self.union_probabilities(probabilities)).sum(2)         # (B, L, *S)
            merged = merged / merged.sum(1, keepdim=True).clamp_min(_EPS)
            logits = merged.clamp_min(_EPS).log()
        if not self.training:
            return logits
        return MergedOutput(logits, weights.detach().mean(dim=(0, *range(3, weights.ndim))))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Activations for nnU-Net's memory estimate: the experts' (where they report them) plus the gate's."""
        voxels = math.prod(int(s) for s in input_size)
        experts = sum(int(e.compute_conv_feature_map_size(input_size)) for e in self.experts
                      if hasattr(e, "compute_conv_feature_map_size"))
        num_labels, num_experts = self.available.shape
        gate = (2 * self.gate.body[0].out_channels + 3 * num_labels * num_experts + num_labels) * voxels
        return experts + gate
