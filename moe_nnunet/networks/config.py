"""Derive the M4oE network's keyword arguments from nnU-Net's architecture kwargs and a patch size.

Shared by the planner (`moe_nnunet plan`) and by the trainers when they run on nnU-Net's stock plans, so
that both paths build the same network for the same patch.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["M4OE_NETWORK_CLASS", "SwinDefaults", "choose_window", "m4oe_arch_kwargs"]

M4OE_NETWORK_CLASS = "moe_nnunet.networks.m4oe_unet.M4oEUNet"

# kwargs of nnU-Net's conv U-Nets that M4oEUNet understands as they are
_SHARED_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                "dropout_op_kwargs", "nonlin", "nonlin_kwargs")


class SwinDefaults:
    """Swin settings the planner uses unless told otherwise.

    max_swin_tokens: a stage becomes a Swin stage once its feature map has at most this many tokens
        (higher-resolution stages stay convolutional: attention there is costly and convolutions
        do as well at fine detail).
    depth: Swin blocks per Swin stage (pairs of plain + shifted windows).
    head_width: channels per attention head.
    max_window: largest attention window per axis.
    """
    max_swin_tokens = 32 ** 3
    depth = 2
    head_width = 32
    max_window = 8
    mlp_ratio = 4.0
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


def m4oe_arch_kwargs(patch_size: Sequence[int], base_kwargs: dict, num_input_channels: int,
                     channel_names: Sequence[str] | None = None,
                     expert_channels: Sequence[Sequence[int]] | None = None,
                     defaults: type[SwinDefaults] = SwinDefaults) -> dict:
    """M4oEUNet kwargs (JSON-serialisable) for a patch size, from nnU-Net conv U-Net kwargs.

    Args:
        patch_size: the configuration's patch size.
        base_kwargs: `arch_kwargs` of a PlainConvUNet or ResidualEncoderUNet plan (or of an M4oE plan).
        num_input_channels: image channels.
        channel_names: names of the channels (dataset.json `channel_names` values), one expert each.
        expert_channels: explicit expert -> input channels map; overrides one-expert-per-channel.
    """
    kw = {k: base_kwargs[k] for k in _SHARED_KEYS if k in base_kwargs}
    if "n_conv_per_stage" not in kw:  # residual-encoder plans name it n_blocks_per_stage
        kw["n_conv_per_stage"] = list(base_kwargs.get("n_blocks_per_stage", [2] * kw["n_stages"]))
    if "n_conv_per_stage_decoder" not in kw:
        kw["n_conv_per_stage_decoder"] = [2] * (kw["n_stages"] - 1)
    strides = [list(map(int, s)) for s in kw["strides"]]
    features = [int(f) for f in kw["features_per_stage"]]

    depths, heads, windows = [], [], []
    size = list(map(int, patch_size))
    for s, stride in enumerate(strides):
        size = [i // j for i, j in zip(size, stride)]
        swin = s > 0 and math.prod(size) <= defaults.max_swin_tokens
        depths.append(defaults.depth if swin else 0)
        heads.append(max(1, features[s] // defaults.head_width) if features[s] % defaults.head_width == 0 else 1)
        windows.append([choose_window(i, defaults.max_window) for i in size])

    if expert_channels is None:
        expert_channels = [[c] for c in range(num_input_channels)]
    if channel_names is not None and len(channel_names) == len(expert_channels):
        names = [str(n) for n in channel_names]
    else:
        names = [f"channel_{'_'.join(map(str, ch))}" for ch in expert_channels]
    kw.update({
        "expert_channels": [list(map(int, ch)) for ch in expert_channels],
        "expert_names": names,
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
