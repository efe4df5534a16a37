"""Dimension-generic shifted-window self-attention stages.

One implementation serves 2D and 3D: tokens are kept channels-last, ``(B, *S, C)``, and every
reshaping works on a list of spatial sizes rather than on a fixed number of axes.

References:
    Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
    Liu et al., "Video Swin Transformer", CVPR 2022 (3D windows).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

__all__ = ["effective_window", "window_partition", "window_reverse", "WindowAttention", "SwinBlock",
           "PatchMerging", "SwinStage"]


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


def _window_attention_mask(spatial: Sequence[int], padded: Sequence[int], window: Sequence[int],
                           shift: Sequence[int], device: torch.device) -> torch.Tensor:
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


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Args:
        dim: token width C.
        num_heads: attention heads; must divide `dim`.
        window_size: largest window per spatial axis; smaller windows (small feature maps) reuse the
            same bias table.
        qkv_bias: bias in the query/key/value projection.
        attn_drop: dropout on attention weights during training.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; choose num_heads so that "
                             f"dim / num_heads is an integer (e.g. a head width of 32).")
        self.num_heads = num_heads
        self.window_size = tuple(int(w) for w in window_size)
        self.attn_drop = attn_drop
        num_offsets = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_index(self, window: Sequence[int], device: torch.device) -> torch.Tensor:
        """(N, N) row of the bias table for every token pair of a window of size `window`."""
        coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij"))
        coords = coords.flatten(1)  # (D, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (D, N, N)
        index = torch.zeros_like(rel[0])
        for axis, w_max in enumerate(self.window_size):
            index = index * (2 * w_max - 1) + rel[axis] + (w_max - 1)
        return index

    def forward(self, x: torch.Tensor, window: Sequence[int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, nW, N, C) windows of tokens.
            window: the window these tokens were cut with (N = prod(window)).
            mask: optional (nW, N, N) bool, True where attention is allowed.
        Returns:
            (B, nW, N, C)
        """
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, hd)
        index = self.relative_position_index(window, x.device).view(-1)
        bias = self.relative_position_bias_table[index].view(n, n, h).permute(2, 0, 1).to(qkv.dtype)  # (h, N, N)
        if mask is None:
            # one (h, N, N) bias broadcast over batch and windows: nothing of size nW x N x N is made
            q, k, v = qkv.reshape(3, b * nw, h, n, c // h).unbind(0)                    # (B*nW, h, N, hd)
            attn_mask = bias.unsqueeze(0)                                                # (1, h, N, N)
        else:
            # windows and heads share one axis so that the per-window mask broadcasts over the batch only
            q, k, v = qkv.reshape(3, b, nw * h, n, c // h).unbind(0)                    # (B, nW*h, N, hd)
            attn_mask = bias.unsqueeze(0).masked_fill(~mask[:, None], float("-inf")).view(1, nw * h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.view(b, nw, h, n, c // h).transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Pre-norm transformer block with (shifted) window attention; tokens are (B, *S, C).

    Args:
        dim: token width C.
        num_heads: attention heads.
        window_size: window per spatial axis.
        shift: shift the windows by half a window (every second block of a stage).
        mlp_ratio: hidden width of the feed-forward network relative to `dim`.
        qkv_bias: bias in the query/key/value projection.
        drop_path: stochastic depth rate of this block.
        mlp_layer: feed-forward module class (the hook an MoE feed-forward would use).
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 mlp_layer: type[nn.Module] = Mlp) -> None:
        super().__init__()
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size) if shift else (0,) * len(self.window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        spatial = list(x.shape[1:-1])
        d = len(spatial)
        window, shift = effective_window(spatial, self.window_size, self.shift_size)
        pad = [(-s) % w for s, w in zip(spatial, window)]
        if any(pad):
            # F.pad lists pads from the last axis backwards; channels come last and are not padded
            x = F.pad(x, [0, 0] + [p for axis_pad in reversed(pad) for p in (0, axis_pad)])
        padded = list(x.shape[1:-1])
        axes = list(range(1, d + 1))
        if any(shift):
            x = torch.roll(x, shifts=[-s for s in shift], dims=axes)
        mask = _window_attention_mask(spatial, padded, window, shift, x.device) if any(shift) or any(pad) else None
        x = window_reverse(self.attn(window_partition(x, window), window, mask), window, padded)
        if any(shift):
            x = torch.roll(x, shifts=list(shift), dims=axes)
        if any(pad):
            x = x[(slice(None),) + tuple(slice(0, s) for s in spatial)]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *S, C) -> (B, *S, C)"""
        x = x + self.drop_path1(self._attend(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Downsample by `stride` with a learned patch merge: a conv whose kernel equals its stride, then LayerNorm.

    Equivalent to Swin's concatenate-neighbours-and-project merge, and it accepts anisotropic strides
    such as (1, 2, 2). Input is channels-first (B, C_in, *S); output is channels-last (B, *S', C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], conv_op: type[nn.Module]
                 ) -> None:
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.reduction = conv_op(in_channels, out_channels, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduction(x)
        return self.norm(x.movedim(1, -1))


class SwinStage(nn.Module):
    """One encoder stage: patch merging followed by `depth` Swin blocks alternating plain/shifted windows.

    Args:
        in_channels: channels of the previous stage.
        out_channels: token width of this stage.
        stride: downsampling of this stage per axis (the planner's stride).
        depth: number of Swin blocks.
        num_heads: attention heads.
        window_size: window per axis.
        conv_op: `nn.Conv2d` or `nn.Conv3d`, sets the dimension.
        mlp_ratio: feed-forward width relative to `out_channels`.
        drop_path: stochastic depth rate per block (list of length `depth`).
    Shapes:
        (B, in_channels, *S) -> (B, out_channels, *S / stride)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], depth: int, num_heads: int,
                 window_size: Sequence[int], conv_op: type[nn.Module], mlp_ratio: float = 4.0,
                 drop_path: Sequence[float] | None = None) -> None:
        super().__init__()
        drop_path = list(drop_path) if drop_path is not None else [0.0] * depth
        if len(drop_path) != depth:
            raise ValueError(f"drop_path has {len(drop_path)} entries but depth is {depth}; give one rate per block.")
        self.output_channels = out_channels
        self.stride = tuple(int(s) for s in stride)
        self.merge = PatchMerging(in_channels, out_channels, stride, conv_op)
        self.blocks = nn.ModuleList([
            SwinBlock(out_channels, num_heads, window_size, shift=bool(i % 2), mlp_ratio=mlp_ratio,
                      drop_path=drop_path[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(out_channels)
        self.mlp_ratio = mlp_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.merge(x)  # (B, *S', C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).movedim(-1, 1).contiguous()

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
        return int(tokens * self.output_channels * (merge + per_block * len(self.blocks)) + 0.5)
