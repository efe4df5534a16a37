"""Checkpoints of the first layout (one encoder module per expert), converted on load.

Up to version 0.1 every expert was a module of its own (`encoder.experts.<e>.stages...`,
`encoder.heads.<e>...`, nn.Linear weights as (out, in)). Now the E experts of a stage are one module whose
parameters are the experts' parameters side by side: grouped convolutions concatenate them along the output
channels, Swin projections stack them along a leading expert axis as (E, in, out), relative position bias
tables put the experts' heads side by side. Plans of that version have no `expert_features_per_stage`, so
the network they build has the old width and the conversion is exact (a test compares outputs).
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict

import torch
from torch import nn

__all__ = ["is_legacy_state_dict", "convert_legacy_state_dict"]

_OLD_EXPERT = re.compile(r"^(?P<pre>.*encoder\.)experts\.(?P<e>\d+)\.(?P<rest>stages\..+)$")
_OLD_HEAD = re.compile(r"^(?P<pre>.*encoder\.)heads\.(?P<e>\d+)\.(?P<rest>projections\..+)$")


def is_legacy_state_dict(state_dict: dict, prefix: str = "") -> bool:
    return any(_OLD_EXPERT.match(k) for k in state_dict if k.startswith(prefix))


def _new_key(rest: str, stages: nn.ModuleList) -> tuple[str | None, str]:
    """New name (relative to `encoder.experts.`) of an old per-expert parameter, and how experts combine:
    "cat0" (grouped conv / norm channels), "cat1" (bias table heads), "stack" (layer norms), "linear_w",
    "linear_b" (Swin projections). None: a duplicate to drop."""
    from moe_nnunet.networks.experts import ExpertConvStage

    m = re.match(r"stages\.(\d+)\.convs\.(\d+)\.(conv|norm|all_modules)\.(.+)$", rest)
    if m:
        s, i, kind, param = int(m[1]), int(m[2]), m[3], m[4]
        if kind == "all_modules":
            return None, ""
        stage = stages[s]
        assert isinstance(stage, ExpertConvStage)
        kinds = [j for j, layer in enumerate(stage.blocks)
                 if (isinstance(layer, nn.modules.conv._ConvNd) if kind == "conv"
                     else not isinstance(layer, nn.modules.conv._ConvNd) and any(True for _ in layer.parameters()))]
        return f"stages.{s}.blocks.{kinds[i]}.{param}", "cat0"
    if ".merge.reduction." in rest:
        return rest, "cat0"
    if rest.endswith("relative_position_bias_table"):
        return rest, "cat1"
    m = re.match(r"(.+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$", rest)
    if m:
        return f"{m[1]}.{m[2].replace('mlp.', '')}.{m[3]}", "linear_w" if m[3] == "weight" else "linear_b"
    return rest, "stack"  # the Swin layer norms


def _combine(tensors: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "cat0":
        width = max(t.shape[1] for t in tensors) if tensors[0].ndim > 1 else None
        if width is not None:  # stem of experts with fewer input channels: zero weights for the padding slots
            tensors = [torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], 1)
                       if t.shape[1] < width else t for t in tensors]
        return torch.cat(tensors, 0)
    if how == "cat1":
        return torch.cat(tensors, 1)
    if how == "linear_w":
        return torch.stack([t.t() for t in tensors])
    if how == "linear_b":
        return torch.stack(tensors).unsqueeze(1)
    return torch.stack(tensors)


def convert_legacy_state_dict(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook of `M4oEUNet`: rewrites a first-layout state dict in place (with a warning)."""
    if not is_legacy_state_dict(state_dict, prefix):
        return
    stages = module.encoder.experts.stages
    grouped: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    how: dict[str, str] = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _OLD_EXPERT.match(key) or _OLD_HEAD.match(key)
        if not m:
            continue
        tensor = state_dict.pop(key)
        if key.startswith(m["pre"] + "heads."):
            new, kind = f"{m['pre']}heads.{m['rest']}", "cat0"
        else:
            rel, kind = _new_key(m["rest"], stages)
            if rel is None:
                continue
            new = f"{m['pre']}experts.{rel}"
        grouped[new][int(m["e"])] = tensor
        how[new] = kind
    for new, per_expert in grouped.items():
        state_dict[new] = _combine([per_expert[e] for e in sorted(per_expert)], how[new])
    warnings.warn("this M4oE checkpoint has the per-expert layout of moe_nnunet 0.1; it was converted to the "
                  "batched-expert layout on loading (the network is the same). Save it again to keep the new "
                  "layout.", stacklevel=3)
