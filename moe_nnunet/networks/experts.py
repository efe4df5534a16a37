"""Modality expert encoders, all E experts as one batched module.

Every tensor between stages is expert-grouped channels-first, (B, E*C, *S): expert e owns channels
[e*C, (e+1)*C). A convolutional stage is a grouped convolution (`groups=E`) followed by a per-channel norm
(nnU-Net's instance norm), which is exactly E independent convolutional experts in one kernel; a Swin stage
stacks the experts' weights (`moe_nnunet.networks.swin`). No Python loop over experts runs in the forward pass.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_nnunet.networks.selection import (clone_module, rebuild_container, select_channel_norm, select_children,
                                           select_grouped_conv)
from moe_nnunet.networks.swin import SwinStage

__all__ = ["ExpertConvStage", "ExpertEncoders", "ExpertHeads"]

_PER_CHANNEL_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d,
                      nn.BatchNorm3d)


class ExpertConvStage(nn.Module):
    """`n_convs` conv -> norm -> nonlinearity blocks of E experts as grouped convolutions.

    Args:
        num_experts: E.
        n_convs: conv blocks; the first one applies `stride`.
        in_channels, out_channels: per expert.
        kernel_size, stride: of the convolutions.
        conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: as in nnU-Net; the norm must act
            per channel (instance or batch norm) so that experts stay independent.
    Shapes:
        (B, E*in_channels, *S) -> (B, E*out_channels, *S / stride)
    """

    def __init__(self, *, num_experts: int, n_convs: int, in_channels: int, out_channels: int,
                 kernel_size: Sequence[int], stride: Sequence[int], conv_op: type[nn.Module], conv_bias: bool,
                 norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None,
                 nonlin_kwargs: dict | None) -> None:
        super().__init__()
        if norm_op is not None and not issubclass(norm_op, _PER_CHANNEL_NORMS):
            raise ValueError(f"norm_op={norm_op.__name__} mixes channels, so grouped experts would see each other; "
                             f"use a per-channel norm (nnU-Net's InstanceNorm, or BatchNorm).")
        self.output_channels = out_channels
        self.stride = tuple(int(s) for s in stride)
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(n_convs):
            layers.append(conv_op(num_experts * channels, num_experts * out_channels, kernel_size,
                                  self.stride if i == 0 else 1, padding=[(k - 1) // 2 for k in kernel_size],
                                  bias=conv_bias, groups=num_experts))
            if norm_op is not None:
                layers.append(norm_op(num_experts * out_channels, **(norm_op_kwargs or {})))
            if nonlin is not None:
                layers.append(nonlin(**(nonlin_kwargs or {})))
            channels = out_channels
        self.num_experts, self.n_convs = num_experts, n_convs
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def select_experts(self, indices: Sequence[int]) -> ExpertConvStage:
        """This stage for the experts `indices` only (see `moe_nnunet.networks.selection`)."""
        layers = [select_grouped_conv(m, indices) if isinstance(m, nn.modules.conv._ConvNd)
                  else select_channel_norm(m, indices, self.num_experts) if isinstance(m, _PER_CHANNEL_NORMS)
                  else m for m in self.blocks]
        return clone_module(self, blocks=rebuild_container(self.blocks, layers), num_experts=len(indices))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """One feature map per conv block, as nnU-Net's `StackedConvBlocks` counts."""
        size = [i // s for i, s in zip(input_size, self.stride)]
        return int(self.n_convs * self.num_experts * self.output_channels * np.prod(size, dtype=np.int64))


class ExpertEncoders(nn.Module):
    """The encoders of E modality experts, one stage per planner stage, run as one module.

    Stage 0 is the convolutional stem (patch embedding at the planner's first stride). Every later stage
    is either a Swin stage (patch merging + `swin_depths[s]` Swin blocks) or, where `swin_depths[s]` is 0,
    a convolutional stage; high-resolution stages are cheaper as convolutions because their token count
    is large. Expert e reads the input channels `expert_channels[e]`; experts reading fewer channels than
    the widest one get zero channels in their place (no effect on the result).

    Args:
        expert_channels: input channel indices of each expert.
        features_per_stage: output width of each expert per stage.
        strides: downsampling of each stage, one list per stage (anisotropic strides allowed).
        kernel_sizes: conv kernel per stage (used by convolutional stages).
        n_conv_per_stage: convs per convolutional stage.
        swin_depths: Swin blocks per stage, 0 for a convolutional stage; stage 0 must be 0.
        num_heads: attention heads per expert and stage (ignored for convolutional stages).
        window_sizes: attention window per stage and axis.
        conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: convolution settings as in
            dynamic_network_architectures.
        mlp_ratio: Swin feed-forward width ratio.
        drop_path_rate: stochastic depth, increasing linearly over all Swin blocks up to this rate.
    Shapes:
        (B, C_in, *S) -> list of (B, E*features_per_stage[s], *S_s), highest resolution first.
    """

    def __init__(self, *, expert_channels: Sequence[Sequence[int]], features_per_stage: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 n_conv_per_stage: Sequence[int], swin_depths: Sequence[int], num_heads: Sequence[int],
                 window_sizes: Sequence[Sequence[int]], conv_op: type[nn.Module], conv_bias: bool,
                 norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None,
                 nonlin_kwargs: dict | None, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
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
        self.num_experts = e = len(expert_channels)
        width = max(len(ch) for ch in expert_channels)
        # input channel read by each stem slot, expert-major; -1 = a zero channel (expert with fewer inputs)
        slots = [list(ch) + [-1] * (width - len(ch)) for ch in expert_channels]
        self.register_buffer("input_index", torch.tensor(slots, dtype=torch.long).flatten(), persistent=False)
        self.needs_zero_channel = any(len(ch) < width for ch in expert_channels)
        rates = np.linspace(0, drop_path_rate, max(1, sum(swin_depths))).tolist()
        stages, channels, used = [], width, 0
        for s in range(n):
            if swin_depths[s] == 0:
                stage = ExpertConvStage(num_experts=e, n_convs=n_conv_per_stage[s], in_channels=channels,
                                        out_channels=features_per_stage[s], kernel_size=kernel_sizes[s],
                                        stride=strides[s], conv_op=conv_op, conv_bias=conv_bias, norm_op=norm_op,
                                        norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
            else:
                stage = SwinStage(channels, features_per_stage[s], strides[s], swin_depths[s], num_heads[s],
                                  window_sizes[s], conv_op, e, mlp_ratio, rates[used:used + swin_depths[s]])
                used += swin_depths[s]
            stages.append(stage)
            channels = features_per_stage[s]
        self.stages = nn.ModuleList(stages)
        self.strides = [tuple(int(i) for i in s) for s in strides]

    def gather_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) -> (B, E*k, *S): each expert's input channels, side by side (k = widest expert)."""
        if self.needs_zero_channel:
            x = torch.cat([x, torch.zeros_like(x[:, :1])], 1)  # index -1 reads this zero channel
        return x.index_select(1, self.input_index % x.shape[1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.gather_inputs(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def select_experts(self, indices: Sequence[int]) -> ExpertEncoders:
        """These encoders for the experts `indices` only, in that order; the stem reads their channels."""
        index = self.input_index.view(self.num_experts, -1)[list(indices)].flatten()
        return select_children(self, indices, input_index=index, needs_zero_channel=bool((index < 0).any()))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        total = 0
        size = list(input_size)
        for stage, stride in zip(self.stages, self.strides):
            total += int(stage.compute_conv_feature_map_size(size))
            size = [i // j for i, j in zip(size, stride)]
        return total


class ExpertHeads(nn.Module):
    """Light segmentation heads of the E experts, used while experts learn their own modality (curriculum).

    Each stage's features go through a grouped 1x1 convolution to class logits per expert, are upsampled to
    the stage-0 resolution and summed, so that every stage of every expert receives a gradient.

    Args:
        num_experts: E.
        features_per_stage: expert widths.
        num_classes: output logits K.
        conv_op: `nn.Conv2d` or `nn.Conv3d`.
    Shapes:
        list of (B, E*C_s, *S_s) -> (B, E, K, *S_0)
    """

    def __init__(self, num_experts: int, features_per_stage: Sequence[int], num_classes: int,
                 conv_op: type[nn.Module]) -> None:
        super().__init__()
        self.num_experts, self.num_classes = num_experts, num_classes
        self.projections = nn.ModuleList([conv_op(num_experts * c, num_experts * num_classes, kernel_size=1,
                                                  groups=num_experts) for c in features_per_stage])
        self.mode = "bilinear" if conv_op is nn.Conv2d else "trilinear"

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        logits = self.projections[0](features[0])
        for proj, f in zip(self.projections[1:], features[1:]):
            logits = logits + F.interpolate(proj(f), size=size, mode=self.mode, align_corners=False)
        return logits.view(logits.shape[0], self.num_experts, self.num_classes, *size)

    def select_experts(self, indices: Sequence[int]) -> ExpertHeads:
        """The heads of the experts `indices` only."""
        projections = rebuild_container(self.projections, [select_grouped_conv(p, indices) for p in self.projections])
        return clone_module(self, projections=projections, num_experts=len(indices))
