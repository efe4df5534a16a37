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

    max_swin_side: a stage becomes a Swin stage once no axis of its feature map is longer than this.
        Higher-resolution stages stay convolutional: window attention costs per token in proportion to the
        window, not the width, so on narrow high-resolution maps it costs several times a convolution, and
        convolutions do as well at fine detail. (80x80 in 2D: the 10x10 and 5x5 stages; 64^3 in 3D: the 8^3 and
        4^3 stages.)
    depth: Swin blocks of a Swin stage whose map is larger than one window (a pair: plain and shifted windows,
        so that information crosses window borders). A stage whose map fits in one window gets one block: its
        attention is already global, and a shifted window would only add masking.
    head_width: channels per attention head.
    max_window: largest attention window per axis. Equal to `max_swin_side`, so every Swin stage the planner
        makes attends over its whole map in one window (at most 10x10 tokens in 2D, 10^3 in 3D).
    mlp_ratio: Swin feed-forward width relative to the expert's width; 2 (Swin-T uses 4) keeps a Swin stage's
        parameters and FLOPs at about those of the two convolutions it replaces.
    """
    max_swin_side = 10
    depth = 2
    head_width = 32
    max_window = 10
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


def expert_width(features: int, num_experts: int, full_resolution: bool = False) -> int:
    """Width of each of E experts at a stage whose nnU-Net width is `features`, rounded to a multiple of 4 (at
    least 4): features / sqrt(E), and features / E at the full-resolution stage (stage 0).

    A convolution's FLOPs and parameters grow with the square of its width, so E grouped experts of width
    F / sqrt(E) cost what one nnU-Net encoder stage of width F costs (E * (F / sqrt(E))^2 = F^2), while their
    activations grow as sqrt(E). At full resolution a step's time goes mostly to moving activations (norms,
    nonlinearities, the gate), not to FLOPs, so there the experts share nnU-Net's width: E experts of F / E
    channels hold as many activations as nnU-Net's stage, at 1/E of its FLOPs. With one expert the width is
    nnU-Net's everywhere. (Measured on CPU in documentation/performance.md.)
    """
    divisor = num_experts if full_resolution else math.sqrt(num_experts)
    return max(4, int(round(features / divisor / 4)) * 4)


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
            together cost about one nnU-Net encoder; stage 0, at full resolution, holds nnU-Net's activations).
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
        expert_features = [expert_width(f, len(expert_channels), full_resolution=s == 0)
                           for s, f in enumerate(features)]
    expert_features = [int(w) for w in expert_features]
    if len(expert_features) != len(features):
        raise ValueError(f"expert_features has {len(expert_features)} widths for {len(features)} stages; give one "
                         f"width per stage.")

    depths, heads, windows = [], [], []
    size = list(map(int, patch_size))
    for s, stride in enumerate(strides):
        size = [i // j for i, j in zip(size, stride)]
        swin = s > 0 and max(size) <= defaults.max_swin_side
        window = [choose_window(i, defaults.max_window) for i in size]
        one_window = all(w >= i for w, i in zip(window, size))
        depths.append((1 if one_window else defaults.depth) if swin else 0)
        heads.append(_heads(expert_features[s], defaults.head_width))
        windows.append(window)

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
