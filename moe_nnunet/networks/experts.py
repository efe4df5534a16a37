"""Modality expert encoders: a convolutional patch-embedding stem, then convolutional or Swin stages."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

from moe_nnunet.networks.swin import SwinStage

__all__ = ["ExpertEncoder", "ExpertHead"]


class ExpertEncoder(nn.Module):
    """Encoder of one modality expert, one stage per planner stage.

    Stage 0 is the convolutional stem (patch embedding at the planner's first stride). Every later stage
    is either a Swin stage (patch merging + `swin_depths[s]` Swin blocks) or, where `swin_depths[s]` is 0,
    a convolutional stage; high-resolution stages are cheaper as convolutions because their token count
    is large.

    Args:
        input_channels: channels this expert reads.
        features_per_stage: output width of each stage.
        strides: downsampling of each stage, one list per stage (anisotropic strides allowed).
        kernel_sizes: conv kernel per stage (used by convolutional stages).
        n_conv_per_stage: convs per convolutional stage.
        swin_depths: Swin blocks per stage, 0 for a convolutional stage; stage 0 must be 0.
        num_heads: attention heads per stage (ignored for convolutional stages).
        window_sizes: attention window per stage and axis.
        conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: convolution settings as in
            dynamic_network_architectures.
        mlp_ratio: Swin feed-forward width ratio.
        drop_path_rate: stochastic depth, increasing linearly over all Swin blocks up to this rate.
    Shapes:
        (B, input_channels, *S) -> list of (B, features_per_stage[s], *S_s), highest resolution first.
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_conv_per_stage: Sequence[int],
                 swin_depths: Sequence[int], num_heads: Sequence[int], window_sizes: Sequence[Sequence[int]],
                 conv_op: type[nn.Module], conv_bias: bool, norm_op: type[nn.Module] | None,
                 norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        n = len(features_per_stage)
        for name, value in (("strides", strides), ("kernel_sizes", kernel_sizes),
                            ("n_conv_per_stage", n_conv_per_stage), ("swin_depths", swin_depths),
                            ("num_heads", num_heads), ("window_sizes", window_sizes)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but there are {n} stages "
                                 f"(features_per_stage); give one entry per stage.")
        if swin_depths[0] != 0:
            raise ValueError("swin_depths[0] must be 0: stage 0 is the convolutional patch-embedding stem.")
        rates = np.linspace(0, drop_path_rate, max(1, sum(swin_depths))).tolist()
        stages, channels, used = [], input_channels, 0
        for s in range(n):
            if swin_depths[s] == 0:
                stage = StackedConvBlocks(n_conv_per_stage[s], conv_op, channels, features_per_stage[s],
                                          kernel_sizes[s], strides[s], conv_bias, norm_op, norm_op_kwargs,
                                          None, None, nonlin, nonlin_kwargs)
            else:
                stage = SwinStage(channels, features_per_stage[s], strides[s], swin_depths[s], num_heads[s],
                                  window_sizes[s], conv_op, mlp_ratio, rates[used:used + swin_depths[s]])
                used += swin_depths[s]
            stages.append(stage)
            channels = features_per_stage[s]
        self.stages = nn.ModuleList(stages)
        self.strides = [tuple(int(i) for i in s) for s in strides]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        total = 0
        size = list(input_size)
        for stage, stride in zip(self.stages, self.strides):
            total += int(stage.compute_conv_feature_map_size(size))
            size = [i // j for i, j in zip(size, stride)]
        return total


class ExpertHead(nn.Module):
    """Light segmentation head of one expert, used while experts learn their own modality (curriculum).

    Each stage's features go through a 1x1 convolution to class logits, are upsampled to the stage-0
    resolution and summed, so that every stage of the expert receives a gradient.

    Args:
        features_per_stage: expert widths.
        num_classes: output logits.
        conv_op: `nn.Conv2d` or `nn.Conv3d`.
    """

    def __init__(self, features_per_stage: Sequence[int], num_classes: int, conv_op: type[nn.Module]) -> None:
        super().__init__()
        self.projections = nn.ModuleList([conv_op(c, num_classes, kernel_size=1) for c in features_per_stage])
        self.mode = "bilinear" if conv_op is nn.Conv2d else "trilinear"

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        logits = self.projections[0](features[0])
        for proj, f in zip(self.projections[1:], features[1:]):
            logits = logits + F.interpolate(proj(f), size=size, mode=self.mode, align_corners=False)
        return logits
