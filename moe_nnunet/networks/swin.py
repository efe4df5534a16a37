"""Dimension-generic shifted-window self-attention stages, for E experts at once.

One implementation serves 2D and 3D: tokens are kept channels-last, ``(E*B, *S, C)`` with the experts as the
outer part of the batch axis (expert-major), and every reshaping works on a list of spatial sizes rather than
on a fixed number of axes. Every weight has a leading expert axis, so E independent Swin encoders run as one
module: projections are batched matrix products (`ExpertLinear`), layer norms normalise each expert with its
own affine (`ExpertLayerNorm`), and attention treats each expert's heads as extra heads of one SDPA call.
With E = 1 these are the ordinary Swin layers.

References:
    Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
    Liu et al., "Video Swin Transformer", CVPR 2022 (3D windows).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch._guards import detect_fake_mode

from moe_nnunet.networks.selection import (clone_module, expert_blocks, narrow_parameter, select_children,
                                           select_grouped_conv)

__all__ = ["effective_window", "window_partition", "window_reverse", "ExpertLinear", "ExpertLayerNorm",
           "WindowAttention", "SwinBlock", "PatchMerging", "SwinStage", "tokens_to_channels",
           "channels_to_tokens"]


def effective_window(spatial: Sequence[int], window: Sequence[int], shift: Sequence[int]
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Clip the window to the feature map; an axis the window already covers is not shifted."""
    win = tuple(min(w, s) for w, s in zip(window, spatial))
    sft = tuple(0 if w >= s else h for w, s, h in zip(window, spatial, shift))
    return win, sft


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, *S, C) -> (B, num_windows, prod(window), C); every S_i must be divisible by window_i."""
    b, *spatial, c = x.shape
    d = len(spatial)
    split = [b]
    for s, w in zip(spatial, window):
        split += [s // w, w]
    x = x.view(split + [c])
    grid_axes = [1 + 2 * i for i in range(d)]
    inner_axes = [2 + 2 * i for i in range(d)]
    x = x.permute([0] + grid_axes + inner_axes + [1 + 2 * d])
    return x.reshape(b, -1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """(B, num_windows, prod(window), C) -> (B, *S, C); inverse of `window_partition`."""
    b, c = windows.shape[0], windows.shape[-1]
    d = len(spatial)
    grid = [s // w for s, w in zip(spatial, window)]
    x = windows.view([b] + grid + list(window) + [c])
    perm = [0]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    return x.permute(perm + [1 + 2 * d]).reshape([b] + list(spatial) + [c])


def channels_to_tokens(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(B, E*C, *S) expert-grouped channels -> (E*B, *S, C) expert-major tokens."""
    b, ec, *spatial = x.shape
    x = x.view(b, num_experts, ec // num_experts, *spatial).movedim(2, -1)  # (B, E, *S, C)
    return x.transpose(0, 1).reshape(num_experts * b, *spatial, ec // num_experts)


def tokens_to_channels(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E*B, *S, C) expert-major tokens -> (B, E*C, *S) expert-grouped channels (contiguous)."""
    eb, *spatial, c = x.shape
    x = x.view(num_experts, eb // num_experts, *spatial, c).movedim(-1, 2)  # (E, B, C, *S)
    return x.transpose(0, 1).reshape(eb // num_experts, num_experts * c, *spatial)


def _window_attention_mask(spatial: tuple[int, ...], padded: tuple[int, ...], window: tuple[int, ...],
                           shift: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Which token pairs of a window may attend to each other, as (num_windows, N, N) bool.

    Two tokens may attend when they come from the same region of the shifted grid (Swin's cyclic-shift
    trick) and neither is padding. Padding tokens only see padding, so no row is ever empty.
    """
    d = len(spatial)
    region = torch.zeros(padded, dtype=torch.long, device=device)
    valid = torch.ones(padded, dtype=torch.bool, device=device)
    for axis in range(d):
        pos = torch.arange(padded[axis], device=device)
        view = [1] * d
        view[axis] = padded[axis]
        r = torch.zeros_like(pos)
        if shift[axis] > 0:
            # in the rolled frame: [0, P-w) untouched, [P-w, P-s) and [P-s, P) come from different places
            r = (pos >= padded[axis] - window[axis]).long() + (pos >= padded[axis] - shift[axis]).long()
        region = region * 3 + r.view(view)
        valid = valid & (pos < spatial[axis]).view(view)
    if any(shift):
        valid = torch.roll(valid, shifts=[-s for s in shift], dims=list(range(d)))
    region = torch.where(valid, region, torch.full_like(region, -1))
    ids = window_partition(region[None, ..., None], window)[0, :, :, 0]  # (nW, N)
    return ids[:, :, None] == ids[:, None, :]


_cached_window_attention_mask = functools.lru_cache(maxsize=64)(_window_attention_mask)


def window_attention_mask(spatial: tuple[int, ...], padded: tuple[int, ...], window: tuple[int, ...],
                          shift: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`_window_attention_mask`, made once per size and device in eager mode; a compiled graph, or a run on fake
    tensors (memory simulation), makes it itself."""
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return _window_attention_mask(spatial, padded, window, shift, device)
    return _cached_window_attention_mask(spatial, padded, window, shift, device)


def relative_position_index(window: Sequence[int], table_window: Sequence[int]) -> torch.Tensor:
    """(N, N) row of a relative-position bias table made for `table_window`, for every token pair of a
    window of size `window` (<= table_window per axis)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)  # (D, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (D, N, N)
    index = torch.zeros_like(rel[0])
    for axis, w_max in enumerate(table_window):
        index = index * (2 * w_max - 1) + rel[axis] + (w_max - 1)
    return index


class ExpertLinear(nn.Module):
    """E independent linear layers applied as one batched matrix product.

    Args:
        num_experts: E.
        in_features, out_features: per expert.
        bias: add a per-expert bias.
    Shapes:
        (E*B, ..., in_features) expert-major -> (E*B, ..., out_features)
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, 1, out_features)) if bias else None
        trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(self.num_experts, -1, self.in_features)  # (E, B*T, in)
        out = torch.bmm(flat, self.weight) if self.bias is None else torch.baddbmm(self.bias, flat, self.weight)
        return out.view(*x.shape[:-1], self.out_features)

    def select_experts(self, indices: Sequence[int]) -> ExpertLinear:
        """The layers of the experts `indices` only (see `moe_nnunet.networks.selection`)."""
        index = torch.as_tensor(list(indices))
        return clone_module(self, weight=narrow_parameter(self.weight, 0, index),
                            bias=narrow_parameter(self.bias, 0, index), num_experts=len(indices))


class ExpertLayerNorm(nn.Module):
    """LayerNorm over the last axis with a separate affine per expert; (E*B, ..., C) expert-major."""

    def __init__(self, num_experts: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_experts, self.dim, self.eps = num_experts, dim, eps
        self.weight = nn.Parameter(torch.ones(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 1:
            return F.layer_norm(x, (self.dim,), self.weight[0], self.bias[0], self.eps)
        y = F.layer_norm(x, (self.dim,), eps=self.eps).view(self.num_experts, -1, self.dim)
        return torch.addcmul(self.bias[:, None], y, self.weight[:, None]).view(x.shape)

    def select_experts(self, indices: Sequence[int]) -> ExpertLayerNorm:
        """The affines of the experts `indices` only."""
        index = torch.as_tensor(list(indices))
        return clone_module(self, weight=narrow_parameter(self.weight, 0, index),
                            bias=narrow_parameter(self.bias, 0, index), num_experts=len(indices))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias, for E experts.

    The E experts' heads are stacked into one head axis of E*h heads, so one SDPA call serves every expert
    with the (E*h, N, N) bias broadcast over batch and windows.

    Args:
        dim: token width C of each expert.
        num_heads: attention heads per expert; must divide `dim`.
        window_size: largest window per spatial axis; smaller windows (small feature maps) reuse the
            same bias table.
        num_experts: E.
        qkv_bias: bias in the query/key/value projection.
        attn_drop: dropout on attention weights during training.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], num_experts: int = 1,
                 qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; choose num_heads so that "
                             f"dim / num_heads is an integer (e.g. a head width of 32).")
        self.num_heads, self.num_experts = num_heads, num_experts
        self.window_size = tuple(int(w) for w in window_size)
        self.attn_drop = attn_drop
        num_offsets = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets, num_experts * num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index",
                             relative_position_index(self.window_size, self.window_size).view(-1), persistent=False)
        self.qkv = ExpertLinear(num_experts, dim, 3 * dim, bias=qkv_bias)
        self.proj = ExpertLinear(num_experts, dim, dim)

    def _bias(self, window: Sequence[int]) -> torch.Tensor:
        """(E*h, N, N) relative position bias of a window."""
        n = math.prod(window)
        if tuple(window) == self.window_size:
            index = self.relative_position_index
        else:  # a feature map smaller than the window: a sub-window of the same table
            index = relative_position_index(window, self.window_size).view(-1).to(self.relative_position_index.device)
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)

    def select_experts(self, indices: Sequence[int]) -> WindowAttention:
        """Attention of the experts `indices` only: their projections and their heads' bias table columns."""
        columns = expert_blocks(indices, self.num_heads)
        return select_children(self, indices, relative_position_bias_table=narrow_parameter(
            self.relative_position_bias_table, 1, columns))

    def forward(self, x: torch.Tensor, window: Sequence[int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (E*B, nW, N, C) windows of tokens, expert-major.
            window: the window these tokens were cut with (N = prod(window)).
            mask: optional (nW, N, N) bool, True where attention is allowed.
        Returns:
            (E*B, nW, N, C)
        """
        eb, nw, n, c = x.shape
        e, h = self.num_experts, self.num_heads
        b, hd = eb // e, c // h
        qkv = self.qkv(x).view(e, b, nw, n, 3, h, hd).permute(4, 1, 2, 0, 5, 3, 6)  # (3, B, nW, E, h, N, hd)
        bias = self._bias(window).to(qkv.dtype)  # (E*h, N, N)
        if mask is None:
            # one (E*h, N, N) bias broadcast over batch and windows: nothing of size nW x N x N is made
            q, k, v = qkv.reshape(3, b * nw, e * h, n, hd).unbind(0)                    # (B*nW, E*h, N, hd)
            attn_mask = bias.unsqueeze(0)                                                # (1, E*h, N, N)
        else:
            # windows and heads share one axis so that the per-window mask broadcasts over the batch only
            q, k, v = qkv.reshape(3, b, nw * e * h, n, hd).unbind(0)                    # (B, nW*E*h, N, hd)
            attn_mask = bias.unsqueeze(0).masked_fill(~mask[:, None], float("-inf")).view(1, nw * e * h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.view(b, nw, e, h, n, hd).permute(2, 0, 1, 4, 3, 5).reshape(eb, nw, n, c)
        return self.proj(out)


class SwinBlock(nn.Module):
    """Pre-norm transformer block with (shifted) window attention for E experts; tokens (E*B, *S, C).

    Args:
        dim: token width C of each expert.
        num_heads: attention heads per expert.
        window_size: window per spatial axis.
        num_experts: E.
        shift: shift the windows by half a window (every second block of a stage).
        mlp_ratio: hidden width of the feed-forward network relative to `dim`.
        qkv_bias: bias in the query/key/value projection.
        drop_path: stochastic depth rate of this block (drawn per expert and sample).
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], num_experts: int = 1,
                 shift: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
                 ) -> None:
        super().__init__()
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size) if shift else (0,) * len(self.window_size)
        self.norm1 = ExpertLayerNorm(num_experts, dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, num_experts, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = ExpertLayerNorm(num_experts, dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = ExpertLinear(num_experts, dim, hidden)
        self.act = nn.GELU()
        self.fc2 = ExpertLinear(num_experts, hidden, dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[1:-1])
        d = len(spatial)
        window, shift = effective_window(spatial, self.window_size, self.shift_size)
        pad = [(-s) % w for s, w in zip(spatial, window)]
        if any(pad):
            # F.pad lists pads from the last axis backwards; channels come last and are not padded
            x = F.pad(x, [0, 0] + [p for axis_pad in reversed(pad) for p in (0, axis_pad)])
        padded = tuple(x.shape[1:-1])
        axes = list(range(1, d + 1))
        if any(shift):
            x = torch.roll(x, shifts=[-s for s in shift], dims=axes)
        mask = window_attention_mask(spatial, padded, window, shift, x.device) if any(shift) or any(pad) else None
        x = window_reverse(self.attn(window_partition(x, window), window, mask), window, padded)
        if any(shift):
            x = torch.roll(x, shifts=list(shift), dims=axes)
        if any(pad):
            x = x[(slice(None),) + tuple(slice(0, s) for s in spatial)]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(E*B, *S, C) -> (E*B, *S, C)"""
        x = x + self.drop_path1(self._attend(self.norm1(x)))
        return x + self.drop_path2(self.fc2(self.act(self.fc1(self.norm2(x)))))

    def select_experts(self, indices: Sequence[int]) -> SwinBlock:
        return select_children(self, indices)


class PatchMerging(nn.Module):
    """Downsample by `stride` with a learned patch merge per expert: a grouped conv whose kernel equals its
    stride, then LayerNorm.

    Equivalent to Swin's concatenate-neighbours-and-project merge, and it accepts anisotropic strides
    such as (1, 2, 2). Input is channels-first and expert-grouped (B, E*C_in, *S); output is expert-major
    tokens (E*B, *S', C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], conv_op: type[nn.Module],
                 num_experts: int = 1) -> None:
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.num_experts = num_experts
        self.reduction = conv_op(num_experts * in_channels, num_experts * out_channels, kernel_size=stride,
                                 stride=stride, groups=num_experts)
        self.norm = ExpertLayerNorm(num_experts, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(channels_to_tokens(self.reduction(x), self.num_experts))

    def select_experts(self, indices: Sequence[int]) -> PatchMerging:
        return select_children(self, indices, reduction=select_grouped_conv(self.reduction, indices))


class SwinStage(nn.Module):
    """One encoder stage of E experts: patch merging followed by `depth` Swin blocks alternating
    plain/shifted windows.

    Args:
        in_channels: channels of each expert in the previous stage.
        out_channels: token width of each expert in this stage.
        stride: downsampling of this stage per axis (the planner's stride).
        depth: number of Swin blocks.
        num_heads: attention heads per expert.
        window_size: window per axis.
        conv_op: `nn.Conv2d` or `nn.Conv3d`, sets the dimension.
        num_experts: E.
        mlp_ratio: feed-forward width relative to `out_channels`.
        drop_path: stochastic depth rate per block (list of length `depth`).
    Shapes:
        (B, E*in_channels, *S) -> (B, E*out_channels, *S / stride)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], depth: int, num_heads: int,
                 window_size: Sequence[int], conv_op: type[nn.Module], num_experts: int = 1,
                 mlp_ratio: float = 4.0, drop_path: Sequence[float] | None = None) -> None:
        super().__init__()
        drop_path = list(drop_path) if drop_path is not None else [0.0] * depth
        if len(drop_path) != depth:
            raise ValueError(f"drop_path has {len(drop_path)} entries but depth is {depth}; give one rate per block.")
        self.num_experts = num_experts
        self.output_channels = out_channels
        self.stride = tuple(int(s) for s in stride)
        self.merge = PatchMerging(in_channels, out_channels, stride, conv_op, num_experts)
        self.blocks = nn.ModuleList([
            SwinBlock(out_channels, num_heads, window_size, num_experts, shift=bool(i % 2), mlp_ratio=mlp_ratio,
                      drop_path=drop_path[i]) for i in range(depth)])
        self.norm = ExpertLayerNorm(num_experts, out_channels)
        self.mlp_ratio = mlp_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.merge(x)  # (E*B, *S', C)
        for block in self.blocks:
            x = block(x)
        return tokens_to_channels(self.norm(x), self.num_experts)

    def select_experts(self, indices: Sequence[int]) -> SwinStage:
        """This stage for the experts `indices` only (see `moe_nnunet.networks.selection`)."""
        return select_children(self, indices)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Activation count in the units of nnU-Net's planner (see `M4oEUNet.compute_conv_feature_map_size`).

        Per block and token a Swin block keeps about (8 + 2 * mlp_ratio) * C values for backward
        (two norms, q/k/v, attention output, projection, MLP hidden before and after GELU, MLP output);
        SDPA's fused kernels do not keep the N x N attention matrix. nnU-Net counts one feature map
        per conv block, which itself keeps about three (conv, norm, nonlinearity), hence the / 3.
        """
        tokens = math.prod(i // s for i, s in zip(input_size, self.stride))
        per_block = (8 + 2 * self.mlp_ratio) / 3
        merge = 2  # merge conv output + its norm
        return int(self.num_experts * tokens * self.output_channels * (merge + per_block * len(self.blocks)) + 0.5)
