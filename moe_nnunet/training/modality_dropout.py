"""Modality dropout: which input modalities each sample of a batch keeps."""
from __future__ import annotations

import torch

__all__ = ["sample_modality_dropout"]


def sample_modality_dropout(batch_size: int, num_modalities: int, p: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Which modalities each sample keeps: (B, M) bool, never all False.

    With probability `p` a sample loses a uniformly drawn non-empty proper subset of its modalities (each of
    the 2^M - 2 subsets equally likely), so at least one modality always stays; otherwise it keeps all.
    With one modality nothing is dropped. (Modality dropout: Neverova et al., "ModDrop", TPAMI 2016.)
    """
    keep = torch.ones(batch_size, num_modalities, dtype=torch.bool)
    if num_modalities < 2 or p <= 0:
        return keep
    drop = torch.rand(batch_size, generator=generator) < p
    n = int(drop.sum())
    if n:
        # a random integer in [1, 2^M - 2] read as a bit mask of the dropped modalities
        codes = torch.randint(1, 2 ** num_modalities - 1, (n,), generator=generator)
        bits = (codes.view(-1, 1) >> torch.arange(num_modalities)) & 1
        keep[drop] = bits == 0
    return keep
