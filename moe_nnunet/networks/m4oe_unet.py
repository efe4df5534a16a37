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

from moe_nnunet.networks.experts import ExpertEncoders, ExpertHeads
from moe_nnunet.networks.gating import ExpertGate
from moe_nnunet.networks.legacy import convert_legacy_state_dict
from moe_nnunet.networks.selection import (clone_module, expert_blocks, narrow_parameter,
                                           rebuild_container, select_children)
from moe_nnunet.networks.swin import ExpertLinear, WindowAttention

__all__ = ["MoEEncoder", "M4oEUNet"]


class MoEEncoder(nn.Module):
    """All experts (one batched module) plus one gate per scale; returns the fused skips a `UNetDecoder` expects.

    The experts' width (`expert_features_per_stage`) may differ from the skips' (`features_per_stage`, the
    decoder's width, nnU-Net's plans): then each fused map is lifted to the skip width by a 1x1 convolution.
    It carries the attributes `UNetDecoder` reads from an encoder (`output_channels`, `strides`,
    `kernel_sizes`, `conv_op`, norm/nonlin/dropout settings, `conv_bias`).
    """

    def __init__(self, *, expert_channels: Sequence[Sequence[int]], num_classes: int,
                 features_per_stage: Sequence[int], expert_features_per_stage: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 n_conv_per_stage: Sequence[int], swin_depths: Sequence[int], num_heads: Sequence[int],
                 window_sizes: Sequence[Sequence[int]], conv_op: type[nn.Module], conv_bias: bool,
                 norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None,
                 nonlin_kwargs: dict | None, mlp_ratio: float, drop_path_rate: float, gate_hidden: int,
                 gate_top_k: int | None, balance_loss_weight: float, z_loss_weight: float,
                 gate_fusion: str = "sum") -> None:
        super().__init__()
        self.expert_channels = [list(map(int, c)) for c in expert_channels]
        num_experts = len(self.expert_channels)
        self.experts = ExpertEncoders(
            expert_channels=self.expert_channels, features_per_stage=expert_features_per_stage, strides=strides,
            kernel_sizes=kernel_sizes, n_conv_per_stage=n_conv_per_stage, swin_depths=swin_depths,
            num_heads=num_heads, window_sizes=window_sizes, conv_op=conv_op, conv_bias=conv_bias, norm_op=norm_op,
            norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate)
        self.gates = nn.ModuleList([
            ExpertGate(c, num_experts, conv_op, gate_hidden, gate_top_k, balance_loss_weight, z_loss_weight,
                       gate_fusion) for c in expert_features_per_stage])
        self.gate_fusion = gate_fusion
        # a 1x1 convolution lifts each fused map to the decoder's width (with "concat" always: it is what combines
        # the experts, and with an expert absent it reads the others' channels alone)
        concat = gate_fusion == "concat"
        self.lifts = nn.ModuleList([conv_op(w * num_experts, f, kernel_size=1) if concat else
                                    nn.Identity() if w == f else conv_op(w, f, kernel_size=1)
                                    for w, f in zip(expert_features_per_stage, features_per_stage)])
        self.heads = ExpertHeads(num_experts, expert_features_per_stage, num_classes, conv_op)
        # read by UNetDecoder
        self.output_channels = list(features_per_stage)
        self.strides = [list(map(int, s)) for s in strides]
        self.kernel_sizes = [list(map(int, k)) for k in kernel_sizes]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs
        self.dropout_op, self.dropout_op_kwargs = None, None

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None, expert_heads: bool = False
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """
        Args:
            x: (B, C_in, *S) image.
            present: (B, E) bool per sample; False marks an expert whose modality is missing. None: all present.
            expert_heads: also return each expert's own logits (the curriculum's light heads).
        Returns:
            `(skips, weights, logits, expert_logits)`: the fused skips, one (B, features_per_stage[s], *S_s)
            tensor per stage; the gates' (B, E, *S_s) float32 weights and router logits per stage; each
            expert's (B, E, K, *S) logits or None.
        """
        features = self.experts(x)  # per stage (B, E*C_s, *S_s)
        skips, weights, logits = [], [], []
        for f, gate, lift in zip(features, self.gates, self.lifts):
            fused, w, lg = gate(f, present)
            skips.append(lift(fused))
            weights.append(w)
            logits.append(lg)
        return skips, weights, logits, self.heads(features) if expert_heads else None

    def select_experts(self, indices: Sequence[int]) -> MoEEncoder:
        """This encoder with the experts `indices` alone, as if the others were absent: their slices of the
        experts, gates and heads; the lifts (no expert axis) are shared."""
        chosen = select_children(self, indices, expert_channels=[self.expert_channels[e] for e in indices])
        if self.gate_fusion == "concat":  # the lifts read every expert's block of channels
            num_experts = len(self.expert_channels)
            chosen.lifts = rebuild_container(self.lifts, [clone_module(
                lift, weight=narrow_parameter(lift.weight, 1, expert_blocks(indices, lift.in_channels // num_experts)),
                in_channels=lift.in_channels // num_experts * len(indices)) for lift in self.lifts])
        return chosen

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        total = self.experts.compute_conv_feature_map_size(input_size)
        size = list(input_size)
        for gate, stride, c in zip(self.gates, self.strides, self.output_channels):
            size = [i // j for i, j in zip(size, stride)]
            # router hidden + logits, and the fused map; the router runs in float32 (twice the bytes)
            fused = gate.hidden.in_channels if self.gate_fusion == "concat" else c
            total += math.prod(size) * (2 * (gate.hidden.out_channels + gate.num_experts) + fused)
        return total


def _drop_expert_subsets(module: M4oEUNet, *args) -> None:
    """`load_state_dict` pre-hook: the narrowed encoders hold copies of the old weights."""
    module.drop_expert_subsets()


class M4oEUNet(nn.Module):
    """U-Net whose encoder is a gated mixture of modality-specific Swin experts (M4oE in nnU-Net).

    Each expert reads its own input channels (by default one expert per `channel_names` entry of
    dataset.json) through a convolutional stem and Swin stages that follow the planner's strides. At every
    scale a gate weights the experts per token (`ExpertGate`), and the fused features feed
    dynamic_network_architectures' `UNetDecoder`, so outputs, deep supervision and checkpoints follow
    nnU-Net's conventions. Keyword arguments are those of nnU-Net's `PlainConvUNet` plus the MoE ones; all
    are JSON-serialisable so the network is built from plans by nnU-Net's `get_network_from_plans`.

    A missing modality masks its expert (`present`, `experts_present`): its features are zeroed before the
    gates and it gets exactly zero gate weight. In training, and whenever samples of a batch differ, all E
    experts still run as one batched module and the absent ones are masked. In eval, without gradients and
    outside torch.compile, a mask shared by the whole batch (how `moe_nnunet predict` masks a group of cases)
    skips the absent experts instead: the forward runs the encoder narrowed to the present experts
    (`expert_subset`), whose output equals the masked one; set `skip_absent_experts = False` to mask instead.

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
        expert_features_per_stage: width of each expert per stage; default `features_per_stage`. The planner
            narrows the experts so that all of them together cost about one nnU-Net encoder
            (`moe_nnunet.networks.config.expert_width`); the fused maps are lifted back to
            `features_per_stage` for the decoder.
        expert_names: a name per expert (modality), used in reports; default `channel_<i>`.
        swin_depths: Swin blocks per stage, 0 for convolutional stages; stage 0 must be 0.
        num_heads: attention heads per stage.
        window_sizes: attention window per stage and axis.
        mlp_ratio: Swin feed-forward width ratio.
        drop_path_rate: maximum stochastic depth rate.
        gate_hidden: router hidden width.
        gate_top_k: keep only the k largest gate weights per token (None: soft gate).
        balance_loss_weight, z_loss_weight: router loss weights.
        gate_fusion: "sum" (M4oE's gated sum; plans without the key) or "concat" (the gated experts side by
            side, combined by each scale's 1x1 lift; see `ExpertGate`).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: type[nn.Module], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_conv_per_stage: Sequence[int] | int, num_classes: int,
                 n_conv_per_stage_decoder: Sequence[int] | int, conv_bias: bool = True,
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 dropout_op: type[nn.Module] | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, expert_channels: Sequence[Sequence[int]] | None = None,
                 expert_features_per_stage: Sequence[int] | None = None, expert_names: Sequence[str] | None = None, swin_depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, window_sizes: Sequence[Sequence[int]] | None = None,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, gate_hidden: int = 32,
                 gate_top_k: int | None = None, balance_loss_weight: float = 1e-2, z_loss_weight: float = 1e-3,
                 gate_fusion: str = "sum") -> None:
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
        if expert_features_per_stage is None:
            expert_features_per_stage = features_per_stage
        if len(expert_features_per_stage) != n_stages:
            raise ValueError(f"expert_features_per_stage has {len(expert_features_per_stage)} entries but "
                             f"n_stages={n_stages}; give one width per stage.")
        self.encoder = MoEEncoder(
            expert_channels=expert_channels, num_classes=num_classes, features_per_stage=features_per_stage,
            expert_features_per_stage=[int(w) for w in expert_features_per_stage], strides=strides,
            kernel_sizes=kernel_sizes, n_conv_per_stage=n_conv_per_stage, swin_depths=swin_depths,
            num_heads=num_heads, window_sizes=window_sizes, conv_op=conv_op, conv_bias=conv_bias, norm_op=norm_op,
            norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate, gate_hidden=gate_hidden, gate_top_k=gate_top_k,
            balance_loss_weight=balance_loss_weight, z_loss_weight=z_loss_weight, gate_fusion=gate_fusion)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                                   dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                                   conv_bias=conv_bias)
        self.num_experts = len(expert_channels)
        # inputs of `forward` that nnU-Net's `network(x)` cannot pass; set by the trainer around its training
        # step (`routing`) and by the predictor (`experts_present`), never inside `forward`
        self._present: torch.Tensor | None = None
        self._route_target: torch.Tensor | None = None
        self.route_weight = 0.0
        # the trainer switches the experts' own heads on during its curriculum
        self.expert_heads_active = False
        # validation statistics: while set, an eval forward keeps the detached mean gate weights per scale
        self.record_gate_means = False
        self.last_gate_means: torch.Tensor | None = None
        # inference without the absent experts: the encoder narrowed to each set of present experts, built on
        # first use and dropped whenever the weights may change (not submodules: not saved, not trained)
        self.skip_absent_experts = True
        self._subsets: dict[tuple[int, ...], MoEEncoder] = {}
        self._sliced: list[torch.Tensor] = []  # the tensors they were sliced from, and the sum of their versions
        self._sliced_version = 0
        self.register_load_state_dict_pre_hook(convert_legacy_state_dict)
        self.register_load_state_dict_pre_hook(_drop_expert_subsets)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None,
                route_target: torch.Tensor | None = None):
        """In eval: (B, C_in, *S) -> logits (B, num_classes, *S), or a list of them (deep supervision,
        highest resolution first), exactly as nnU-Net expects.

        In training: a dict (read by `moe_nnunet.training.MoETrainingLoss`) with
            "logits": the logits as above;
            "aux_loss": scalar, the gates' weighted router losses;
            "expert_logits": (B, E, K, *S) each expert's own logits while `expert_heads_active`, else None;
            "gate_means": (n_stages, E) detached mean gate weight per scale;
            "gate_weights": (B, E, *S) detached full-resolution gate weights.
        Everything that needs a gradient leaves through this return value, so DDP and torch.compile see one
        graph.

        Args:
            present: (B, E) or (E,) bool; masks the experts of missing modalities (zero gate weight); in eval
                without gradients, experts absent from every sample are not computed. nnU-Net calls
                `network(x)`: `experts_present` / `routing` set it then.
            route_target: (B,) long, the expert each sample should be routed to (-1: unknown), for datasets
                combined across modalities; the routing loss is weighted by `route_weight`.
        """
        expected = 1 + max(c for channels in self.expert_channels for c in channels)
        if x.shape[1] != expected:
            experts = ", ".join(f"{n}: {c}" for n, c in zip(self.expert_names, self.expert_channels))
            raise ValueError(
                f"this M4oE network reads {expected} input channels (experts {experts}) but got {x.shape[1]}. Give "
                f"every case one image per channel, CASE_0000 to CASE_{expected - 1:04d}, as in training; to "
                f"predict with a modality missing, use `moe_nnunet predict`, which masks that modality's expert.")
        present = self._present if present is None else present
        if present is not None and present.ndim == 1:
            present = present.view(1, -1).expand(x.shape[0], -1)
        encoder, kept = self.encoder, None
        if present is not None and not self.training and not torch.compiler.is_compiling():
            encoder, present, kept = self._inference_encoder(present)
        heads = self.training and self.expert_heads_active
        skips, weights, logits, expert_logits = encoder(x, present, heads)
        out = self.decoder(skips)
        gate_means = None
        if self.training or self.record_gate_means:
            gate_means = torch.stack([w.detach().mean(dim=[0, *range(2, w.ndim)]) for w in weights])  # (n, E)
            if encoder is not self.encoder:  # (n, len(kept)): the skipped experts' weight is 0
                gate_means = gate_means.new_zeros(len(weights), self.num_experts).index_copy_(
                    1, torch.tensor(kept, device=gate_means.device), gate_means)
        if not self.training:
            if self.record_gate_means:
                self.last_gate_means = gate_means
            return out
        route_target = self._route_target if route_target is None else route_target
        aux = sum(gate.router_losses(lg, present, route_target, self.route_weight)
                  for gate, lg in zip(self.encoder.gates, logits))
        return {"logits": out, "aux_loss": aux, "expert_logits": expert_logits, "gate_means": gate_means,
                "gate_weights": weights[0].detach()}

    def _inference_encoder(self, present: torch.Tensor
                           ) -> tuple[MoEEncoder, torch.Tensor | None, tuple[int, ...] | None]:
        """The encoder an eager eval forward runs for the (B, E) mask `present`, the mask it needs, and the
        experts it keeps: without gradients and with one mask for the whole batch, the encoder of the present
        experts alone (no mask); otherwise the full encoder and the mask. Refuses a sample without any expert."""
        mask = present.detach().cpu()  # read once on the host
        if not bool(mask.any(-1).all()):
            raise ValueError("every expert is marked absent for a sample; at least one modality must be present.")
        if not self.skip_absent_experts or torch.is_grad_enabled() or not bool((mask == mask[:1]).all()):
            return self.encoder, present, None
        kept = tuple(mask[0].nonzero().flatten().tolist())
        return self.expert_subset(kept), None, kept

    @property
    def expert_channels(self) -> list[list[int]]:
        return self.encoder.expert_channels

    def experts_present_for_channels(self, channel_present: torch.Tensor) -> torch.Tensor:
        """Expert availability from channel availability: (..., C_in) bool -> (..., E) bool. An expert is
        present when any of its channels is."""
        return torch.stack([channel_present[..., ch].any(-1) for ch in self.expert_channels], dim=-1)

    def expert_subset(self, kept: Sequence[int]) -> MoEEncoder:
        """The encoder of the experts `kept` alone (`MoEEncoder.select_experts`), which eval forwards use when
        the other experts are absent for the whole batch; the network's own encoder when all are kept.

        Built once per subset and kept until the weights may change: `train()`, `load_state_dict`, `to()` /
        `cuda()` / a dtype change, or an in-place change of an expert or gate tensor (its version counter).
        """
        key = tuple(int(e) for e in kept)
        if len(key) == self.num_experts:
            return self.encoder
        if self._subsets and sum(t._version for t in self._sliced) != self._sliced_version:
            self.drop_expert_subsets()  # an in-place change (load_state_dict, copy_, an optimiser step)
        if not self._subsets:
            self._sliced = [t for module in (self.encoder.experts, self.encoder.gates)
                            for t in (*module.parameters(), *module.buffers())]
            self._sliced_version = sum(t._version for t in self._sliced)
        if key not in self._subsets:
            # plain tensors even when called under inference_mode (nnU-Net's predictor), so later calls may use them
            with torch.inference_mode(False), torch.no_grad():
                self._subsets[key] = self.encoder.select_experts(key)
        return self._subsets[key]

    def drop_expert_subsets(self) -> None:
        """Forget the encoders built by `expert_subset` (their weights are copies)."""
        self._subsets.clear()
        self._sliced = []

    def train(self, mode: bool = True) -> M4oEUNet:
        if mode:
            self.drop_expert_subsets()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.drop_expert_subsets()  # to(), cuda(), half(), ...: the copies would keep the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    @contextmanager
    def experts_present(self, present: torch.Tensor | None) -> Iterator[None]:
        """Within the block, calls without an explicit `present` use this mask ((B, E) or (E,) bool).

        In eval, without gradients, and with the same mask for every sample (how `moe_nnunet predict` uses it,
        one mask per group of cases), the absent experts are not computed at all: the forward runs the
        encoder narrowed to the present experts (`expert_subset`), which gives what masking gives.
        """
        previous, self._present = self._present, present
        try:
            yield
        finally:
            self._present = previous

    @contextmanager
    def routing(self, present: torch.Tensor, route_target: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block (one training step), calls use this (B, E) expert mask and (B,) routing target."""
        previous = self._present, self._route_target
        self._present, self._route_target = present, route_target
        try:
            yield
        finally:
            self._present, self._route_target = previous

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Activation count used by nnU-Net's planner to fit the patch size to a GPU-memory target."""
        return int(self.encoder.compute_conv_feature_map_size(input_size)
                   + self.decoder.compute_conv_feature_map_size(input_size))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He init for convolutions, ViT init for linear layers; gates start even (1/E each)."""
        InitWeights_He(1e-2)(module)
        if isinstance(module, ExpertLinear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, WindowAttention):
            trunc_normal_(module.relative_position_bias_table, std=0.02)
        elif isinstance(module, ExpertGate):
            module.reset_router()  # runs after its children: nn.Module.apply visits children first
