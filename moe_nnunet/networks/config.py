"""Derive the M4oE network's keyword arguments from nnU-Net's architecture kwargs and a patch size.

Shared by the planner (`moe_nnunet plan`) and by the trainers when they run on nnU-Net's stock plans, so
that both paths build the same network for the same patch.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["M4OE_NETWORK_CLASS", "SwinDefaults", "choose_window", "expert_width", "m4oe_arch_kwargs"]

M4OE_NETWORK_CLASS = "moe_nnunet.networks.m4oe_unet.M4oEUNet"

# kwargs of nnU-Net's conv U-Nets that M4oEUNet understands as they are
_SHARED_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                "dropout_op_kwargs", "nonlin", "nonlin_kwargs")


class SwinDefaults:
    """Swin settings the planner uses unless told otherwise.

    max_swin_side: a stage becomes a Swin stage once no axis of its feature map is longer than this, so
        that a window (up to `max_window` per axis) spans most of the map. Higher-resolution stages stay
        convolutional: window attention costs per token in proportion to the window, not the width, so on
        narrow high-resolution maps it costs several times a convolution, and convolutions do as well at
        fine detail. (80x80 in 2D: the 10x10 and 5x5 stages; 64^3 in 3D: the 8^3 and smaller stages.)
    depth: Swin blocks per Swin stage (pairs of plain + shifted windows).
    head_width: channels per attention head.
    max_window: largest attention window per axis.
    mlp_ratio: Swin feed-forward width relative to the expert's width; 2 (Swin-T uses 4) keeps a Swin stage's
        parameters and FLOPs at about those of the two convolutions it replaces.
    """
    max_swin_side = 10
    depth = 2
    head_width = 32
    max_window = 8
    mlp_ratio = 2.0
    drop_path_rate = 0.1
    gate_hidden = 32


def choose_window(size: int, max_window: int = SwinDefaults.max_window) -> int:
    """Window for one axis of a feature map: the whole axis when it fits, otherwise the largest divisor of
    `size` in [4, max_window] (no padding), otherwise `max_window` (the block pads)."""
    if size <= max_window:
        return max(1, size)
    for w in range(max_window, 3, -1):
        if size % w == 0:
            return w
    return max_window


def expert_width(features: int, num_experts: int) -> int:
    """Width of each of E experts at a stage whose nnU-Net width is `features`: features / sqrt(E), rounded to a
    multiple of 4 (at least 4).

    A convolution's cost grows with the square of its width, so E grouped experts of width F / sqrt(E) cost
    what one nnU-Net encoder stage of width F costs (E * (F / sqrt(E))^2 = F^2), in FLOPs and in parameters;
    activations grow as sqrt(E). With one expert the width is nnU-Net's.
    """
    return max(4, int(round(features / math.sqrt(num_experts) / 4)) * 4)


def _heads(width: int, head_width: int) -> int:
    """Attention heads of a `width`-wide Swin stage: about width / head_width, dividing the width."""
    heads = max(1, round(width / head_width))
    while width % heads:
        heads -= 1
    return heads


def m4oe_arch_kwargs(patch_size: Sequence[int], base_kwargs: dict, num_input_channels: int,
                     channel_names: Sequence[str] | None = None,
                     expert_channels: Sequence[Sequence[int]] | None = None,
                     defaults: type[SwinDefaults] = SwinDefaults,
                     expert_features: Sequence[int] | None = None) -> dict:
    """M4oEUNet kwargs (JSON-serialisable) for a patch size, from nnU-Net conv U-Net kwargs.

    Args:
        patch_size: the configuration's patch size.
        base_kwargs: `arch_kwargs` of a PlainConvUNet or ResidualEncoderUNet plan (or of an M4oE plan).
        num_input_channels: image channels.
        channel_names: names of the channels (dataset.json `channel_names` values), one expert each.
        expert_channels: explicit expert -> input channels map; overrides one-expert-per-channel.
        defaults: Swin settings.
        expert_features: each expert's width per stage; default `expert_width` of nnU-Net's width (all experts
            together cost about one nnU-Net encoder).
    """
    kw = {k: base_kwargs[k] for k in _SHARED_KEYS if k in base_kwargs}
    if "n_conv_per_stage" not in kw:  # residual-encoder plans name it n_blocks_per_stage
        kw["n_conv_per_stage"] = list(base_kwargs.get("n_blocks_per_stage", [2] * kw["n_stages"]))
    if "n_conv_per_stage_decoder" not in kw:
        kw["n_conv_per_stage_decoder"] = [2] * (kw["n_stages"] - 1)
    strides = [list(map(int, s)) for s in kw["strides"]]
    features = [int(f) for f in kw["features_per_stage"]]

    if expert_channels is None:
        expert_channels = [[c] for c in range(num_input_channels)]
    if expert_features is None:
        expert_features = [expert_width(f, len(expert_channels)) for f in features]
    expert_features = [int(w) for w in expert_features]
    if len(expert_features) != len(features):
        raise ValueError(f"expert_features has {len(expert_features)} widths for {len(features)} stages; give one "
                         f"width per stage.")

    depths, heads, windows = [], [], []
    size = list(map(int, patch_size))
    for s, stride in enumerate(strides):
        size = [i // j for i, j in zip(size, stride)]
        swin = s > 0 and max(size) <= defaults.max_swin_side
        depths.append(defaults.depth if swin else 0)
        heads.append(_heads(expert_features[s], defaults.head_width))
        windows.append([choose_window(i, defaults.max_window) for i in size])

    if channel_names is not None and len(channel_names) == len(expert_channels):
        names = [str(n) for n in channel_names]
    else:
        names = [f"channel_{'_'.join(map(str, ch))}" for ch in expert_channels]
    kw.update({
        "expert_channels": [list(map(int, ch)) for ch in expert_channels],
        "expert_names": names,
        "expert_features_per_stage": expert_features,
        "swin_depths": depths,
        "num_heads": heads,
        "window_sizes": windows,
        "mlp_ratio": defaults.mlp_ratio,
        "drop_path_rate": defaults.drop_path_rate,
        "gate_hidden": defaults.gate_hidden,
        "gate_top_k": None,
        "balance_loss_weight": 1e-2,
        "z_loss_weight": 1e-3,
    })
    return kw
