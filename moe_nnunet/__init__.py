"""moe_nnunet: Mixture-of-Experts segmentation (modality-specific Swin experts + gating) inside nnU-Net v2."""
__version__ = "0.1.0"
