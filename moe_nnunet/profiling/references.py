"""Reference networks that `moe_nnunet bench` measures beside ours and nnU-Net's PlainConvUNet.

* `resenc_m`: nnU-Net's residual-encoder U-Net with the blocks of its ResEnc M preset (Isensee et al., "nnU-Net
  Revisited: A Call for Rigorous Validation in 3D Medical Image Segmentation", MICCAI 2024) over the same
  stages, kernels and strides as the PlainConvUNet baseline.
* `swinunetr`: MONAI's SwinUNETR, feature size 48 (Hatamizadeh et al., "Swin UNETR: Swin Transformers for
  Semantic Segmentation of Brain Tumors in MRI Images", BrainLes 2021), an optional dependency
  (`pip install monai`); without it, or for a patch it cannot take, it is skipped with the reason.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from torch import nn

__all__ = ["REFERENCES", "RESENC_UNET", "SWIN_UNETR", "resenc_m_kwargs", "swinunetr_unavailable",
           "SwinUNETRForBench"]

REFERENCES = ("resenc_m", "swinunetr")
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
SWIN_UNETR = "moe_nnunet.profiling.references.SwinUNETRForBench"
# nnU-Net's ResEncUNetMPlanner: residual blocks per encoder stage, one conv per decoder stage
_RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
# SwinUNETR halves the resolution five times (patch embedding + four Swin stages)
SWIN_UNETR_DIVISOR = 32


def resenc_m_kwargs(conv_kwargs: dict) -> dict:
    """ResidualEncoderUNet kwargs (JSON form) with ResEnc M's blocks over a PlainConvUNet's topology."""
    n = int(conv_kwargs["n_stages"])
    if n > len(_RESENC_M_BLOCKS):
        raise ValueError(f"{n} stages: ResEnc M defines blocks for at most {len(_RESENC_M_BLOCKS)}.")
    kwargs = {k: v for k, v in conv_kwargs.items() if k != "n_conv_per_stage"}
    kwargs["n_blocks_per_stage"] = list(_RESENC_M_BLOCKS[:n])
    kwargs["n_conv_per_stage_decoder"] = [1] * (n - 1)
    return kwargs


def swinunetr_unavailable(patch_size: Sequence[int]) -> str | None:
    """Why SwinUNETR cannot be measured on this patch (None when it can)."""
    if importlib.util.find_spec("monai") is None:
        return "MONAI is not installed (pip install monai)"
    if len(patch_size) not in (2, 3) or any(int(p) % SWIN_UNETR_DIVISOR or int(p) < 2 * SWIN_UNETR_DIVISOR
                                            for p in patch_size):
        # and at least 2 voxels per axis at 1/32, where its instance norm needs more than one while training
        return (f"SwinUNETR needs every patch axis a multiple of {SWIN_UNETR_DIVISOR} and at least "
                f"{2 * SWIN_UNETR_DIVISOR}; patch {list(patch_size)}")
    return None


class SwinUNETRForBench(nn.Module):
    """MONAI's SwinUNETR behind the constructor nnU-Net's `get_network_from_plans` calls, for the benchmark.

    SwinUNETR has no deep supervision: `deep_supervision` is accepted and ignored, and the benchmark trains it
    with nnU-Net's loss on its one full-resolution output.

    Args:
        input_channels: image channels.
        num_classes: segmentation outputs.
        deep_supervision: ignored.
        feature_size: SwinUNETR's embedding width (48 in its paper's BraTS model).
        spatial_dims: 2 or 3.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 feature_size: int = 48, spatial_dims: int = 3) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR
        self.net = SwinUNETR(in_channels=input_channels, out_channels=num_classes, feature_size=feature_size,
                             spatial_dims=spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
