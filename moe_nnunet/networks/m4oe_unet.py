"""M4oE U-Net: modality-specific Swin experts, gated fusion at every scale, nnU-Net's convolutional decoder."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.layers import trunc_normal_
from torch import nn

from moe_nnunet.networks.experts import ExpertEncoder, ExpertHead
from moe_nnunet.networks.gating import ExpertGate
from moe_nnunet.networks.swin import WindowAttention

__all__ = ["MoEEncoder", "M4oEUNet"]


class MoEEncoder(nn.Module):
    """All experts plus one gate per scale; returns the fused skips a `UNetDecoder` expects.

    It carries the attributes `UNetDecoder` reads from an encoder (`output_channels`, `strides`,
    `kernel_sizes`, `conv_op`, norm/nonlin/dropout settings, `conv_bias`).
    """

    def __init__(self, expert_channels: Sequence[Sequence[int]], num_classes: int,
                 features_per_stage: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_conv_per_stage: Sequence[int],
                 swin_depths: Sequence[int], num_heads: Sequence[int], window_sizes: Sequence[Sequence[int]],
                 conv_op: type[nn.Module], conv_bias: bool, norm_op: type[nn.Module] | None,
                 norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None,
                 mlp_ratio: float, drop_path_rate: float, gate_hidden: int, gate_top_k: int | None,
                 balance_loss_weight: float, z_loss_weight: float) -> None:
        super().__init__()
        self.expert_channels = [list(map(int, c)) for c in expert_channels]
        self.experts = nn.ModuleList([
            ExpertEncoder(len(ch), features_per_stage, strides, kernel_sizes, n_conv_per_stage, swin_depths,
                          num_heads, window_sizes, conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin,
                          nonlin_kwargs, mlp_ratio, drop_path_rate) for ch in self.expert_channels])
        self.gates = nn.ModuleList([
            ExpertGate(c, len(self.expert_channels), conv_op, gate_hidden, gate_top_k, balance_loss_weight,
                       z_loss_weight) for c in features_per_stage])
        self.heads = nn.ModuleList([ExpertHead(features_per_stage, num_classes, conv_op)
                                    for _ in self.expert_channels])
        # read by UNetDecoder
        self.output_channels = list(features_per_stage)
        self.strides = [list(map(int, s)) for s in strides]
        self.kernel_sizes = [list(map(int, k)) for k in kernel_sizes]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs
        self.dropout_op, self.dropout_op_kwargs = None, None
        # set by the trainer during its expert curriculum; then `expert_logits` holds each expert's own prediction
        self.expert_heads_active = False
        self.expert_logits: list[torch.Tensor] = []
        # availability of the experts used when `forward` gets none: (B, E) or (E,) bool, None = all present
        self.present: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> list[torch.Tensor]:
        """
        Args:
            x: (B, C_in, *S) image.
            present: (B, E) bool per sample, or (E,) for the whole batch; False marks an expert whose modality
                is missing. Defaults to `self.present`; None means every expert is present.
        Returns:
            fused skips, one (B, features_per_stage[s], *S_s) tensor per stage.
        """
        if present is None:
            present = self.present
        if present is not None and present.ndim == 1:
            present = present.view(1, -1).expand(x.shape[0], -1)
        skip_absent = present is not None and not self.training and not torch.compiler.is_compiling()
        available = present.any(0).tolist() if skip_absent else [True] * len(self.experts)
        if not any(available):
            raise ValueError("every expert is marked absent; at least one modality must be present.")
        per_expert = [expert(x[:, ch]) if use else None
                      for expert, ch, use in zip(self.experts, self.expert_channels, available)]
        if not all(available):  # inference without a modality: skip its expert, give the gate zeros
            reference = per_expert[available.index(True)]
            per_expert = [f if f is not None else [torch.zeros_like(r) for r in reference] for f in per_expert]
        skips = [gate([f[s] for f in per_expert], present) for s, gate in enumerate(self.gates)]
        if self.training and self.expert_heads_active:
            self.expert_logits = [head(f) for head, f in zip(self.heads, per_expert)]
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        total = sum(e.compute_conv_feature_map_size(input_size) for e in self.experts)
        size = list(input_size)
        for gate, stride, c in zip(self.gates, self.strides, self.output_channels):
            size = [i // j for i, j in zip(size, stride)]
            # router hidden + logits, and the fused map; the router runs in float32 (twice the bytes)
            total += math.prod(size) * (2 * (gate.hidden.out_channels + gate.num_experts) + c)
        return total


class M4oEUNet(nn.Module):
    """U-Net whose encoder is a gated mixture of modality-specific Swin experts (M4oE in nnU-Net).

    Each expert reads its own input channels (by default one expert per `channel_names` entry of
    dataset.json) through a convolutional stem and Swin stages that follow the planner's strides. At every
    scale a gate weights the experts per token (`ExpertGate`), and the fused features feed
    dynamic_network_architectures' `UNetDecoder`, so outputs, deep supervision and checkpoints follow
    nnU-Net's conventions. Keyword arguments are those of nnU-Net's `PlainConvUNet` plus the MoE ones; all
    are JSON-serialisable so the network is built from plans by nnU-Net's `get_network_from_plans`.

    Reference: Jiang et al., "M4oE: A Foundation Model for Medical Multimodal Image Segmentation with
    Mixture of Experts", MICCAI 2024.

    Args:
        input_channels: image channels.
        n_stages: encoder stages (planner).
        features_per_stage: widths per stage, shared by every expert and the decoder.
        conv_op: `nn.Conv2d` or `nn.Conv3d`.
        kernel_sizes, strides: per-stage conv kernels and downsampling (planner).
        n_conv_per_stage: convs per convolutional encoder stage.
        num_classes: segmentation outputs.
        n_conv_per_stage_decoder: convs per decoder stage.
        conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs: as in
            nnU-Net (dropout is not used by the experts).
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        expert_channels: input channel indices of each expert; default one expert per channel.
        expert_names: a name per expert (modality), used in reports; default `channel_<i>`.
        swin_depths: Swin blocks per stage, 0 for convolutional stages; stage 0 must be 0.
        num_heads: attention heads per stage.
        window_sizes: attention window per stage and axis.
        mlp_ratio: Swin feed-forward width ratio.
        drop_path_rate: maximum stochastic depth rate.
        gate_hidden: router hidden width.
        gate_top_k: keep only the k largest gate weights per token (None: soft gate).
        balance_loss_weight, z_loss_weight: router loss weights.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_conv_per_stage: Sequence[int] | int, num_classes: int,
                 n_conv_per_stage_decoder: Sequence[int] | int, conv_bias: bool = True,
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 dropout_op: type[nn.Module] | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, expert_channels: Sequence[Sequence[int]] | None = None,
                 expert_names: Sequence[str] | None = None, swin_depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, window_sizes: Sequence[Sequence[int]] | None = None,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, gate_hidden: int = 32,
                 gate_top_k: int | None = None, balance_loss_weight: float = 1e-2, z_loss_weight: float = 1e-3
                 ) -> None:
        super().__init__()
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * n_stages
        for name, value in (("features_per_stage", features_per_stage), ("strides", strides),
                            ("kernel_sizes", kernel_sizes), ("n_conv_per_stage", n_conv_per_stage)):
            if len(value) != n_stages:
                raise ValueError(f"{name} has {len(value)} entries but n_stages={n_stages}; "
                                 f"give one entry per stage.")
        if any(int(s) != 1 for s in strides[0]):
            raise ValueError(f"strides[0]={list(strides[0])}: the first stage must keep full resolution "
                             f"(stride 1), as in nnU-Net's plans.")
        if swin_depths is None or num_heads is None or window_sizes is None:
            raise ValueError("swin_depths, num_heads and window_sizes are required; plans made by "
                             "`moe_nnunet plan` contain them, and moe_nnunet.networks.config.m4oe_arch_kwargs "
                             "derives them from nnU-Net's own plans.")
        if expert_channels is None:
            expert_channels = [[c] for c in range(input_channels)]
        bad = [c for ch in expert_channels for c in ch if not 0 <= int(c) < input_channels]
        if bad or any(len(ch) == 0 for ch in expert_channels):
            raise ValueError(f"expert_channels={expert_channels} must list, per expert, at least one input "
                             f"channel index in [0, {input_channels}); the dataset has {input_channels} "
                             f"channel(s).")
        self.expert_names = list(expert_names) if expert_names is not None else \
            [f"channel_{'_'.join(map(str, ch))}" for ch in expert_channels]
        if len(self.expert_names) != len(expert_channels):
            raise ValueError(f"{len(self.expert_names)} expert_names for {len(expert_channels)} experts; "
                             f"give one name per entry of expert_channels.")
        self.encoder = MoEEncoder(expert_channels, num_classes, features_per_stage, strides, kernel_sizes,
                                  n_conv_per_stage, swin_depths, num_heads, window_sizes, conv_op, conv_bias,
                                  norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, mlp_ratio, drop_path_rate,
                                  gate_hidden, gate_top_k, balance_loss_weight, z_loss_weight)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                                   dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                                   conv_bias=conv_bias)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None):
        """(B, C_in, *S) -> logits (B, num_classes, *S), or a list of them (deep supervision, highest first).

        `present` ((B, E) or (E,) bool) masks the experts of missing modalities: they get zero gate weight
        and, in eval, are not computed. nnU-Net calls `network(x)`; `experts_present` sets the mask then.
        """
        expected = 1 + max(c for channels in self.expert_channels for c in channels)
        if x.shape[1] != expected:
            experts = ", ".join(f"{n}: {c}" for n, c in zip(self.expert_names, self.expert_channels))
            raise ValueError(
                f"this M4oE network reads {expected} input channels (experts {experts}) but got {x.shape[1]}. Give "
                f"every case one image per channel, CASE_0000 to CASE_{expected - 1:04d}, as in training; to "
                f"predict with a modality missing, use `moe_nnunet predict`, which masks that modality's expert.")
        return self.decoder(self.encoder(x, present))

    @property
    def expert_channels(self) -> list[list[int]]:
        return self.encoder.expert_channels

    def experts_present_for_channels(self, channel_present: torch.Tensor) -> torch.Tensor:
        """Expert availability from channel availability: (..., C_in) bool -> (..., E) bool. An expert is
        present when any of its channels is."""
        return torch.stack([channel_present[..., ch].any(-1) for ch in self.expert_channels], dim=-1)

    @contextmanager
    def experts_present(self, present: torch.Tensor | None) -> Iterator[None]:
        """Within the block, calls without an explicit `present` use this mask ((B, E) or (E,) bool)."""
        previous, self.encoder.present = self.encoder.present, present
        try:
            yield
        finally:
            self.encoder.present = previous

    def auxiliary_loss(self) -> torch.Tensor:
        """Sum of the gates' weighted router losses from the last forward pass (0 in eval)."""
        return sum(gate.aux_loss for gate in self.encoder.gates)

    def pop_expert_logits(self) -> list[torch.Tensor]:
        """Each expert's own full-resolution logits from the last training forward pass (while
        `encoder.expert_heads_active`), handed over once so the graph is freed after the loss."""
        logits, self.encoder.expert_logits = self.encoder.expert_logits, []
        return logits

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Activation count used by nnU-Net's planner to fit the patch size to a GPU-memory target."""
        return int(self.encoder.compute_conv_feature_map_size(input_size)
                   + self.decoder.compute_conv_feature_map_size(input_size))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He init for convolutions, ViT init for attention; gates start even (1/E each)."""
        InitWeights_He(1e-2)(module)
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, WindowAttention):
            trunc_normal_(module.relative_position_bias_table, std=0.02)
        elif isinstance(module, ExpertGate):
            module.reset_router()  # runs after its children: nn.Module.apply visits children first
