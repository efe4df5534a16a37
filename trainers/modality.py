"""Modality dropout for nnU-Net trainers, and nnU-Net's own network trained with it (a missing-modality baseline)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from moe_nnunet.trainers.checkpointing import AtomicCheckpoints
from moe_nnunet.training import sample_modality_dropout

__all__ = ["ModalityDropout", "nnUNetTrainerChannelDropout"]


class ModalityDropout:
    """Trainer mixin: each training sample loses a random subset of its input channels (modalities), at
    least one kept, before nnU-Net's `train_step`; dropped channels are zero-filled, which after nnU-Net's
    normalisation is the mean intensity of the channel.

    `modality_dropout_p` (default 0.5, a class attribute; subclass to change it, 0 switches it off) is
    the probability that a sample loses any modality; which ones is drawn uniformly from the non-empty
    proper subsets (`moe_nnunet.training.sample_modality_dropout`). Data augmentation, loss and optimiser
    are nnU-Net's. Subclasses can react to the mask through `modalities_dropped`.
    """
    modality_dropout_p: float = 0.5

    def kept_modalities(self, batch_size: int, num_channels: int) -> torch.Tensor:
        """(B, C) bool mask of the channels each sample keeps in this training step."""
        return sample_modality_dropout(batch_size, num_channels, self.modality_dropout_p)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"]
        keep = self.kept_modalities(data.shape[0], data.shape[1])
        if not bool(keep.all()):
            view = keep.shape + (1,) * (data.ndim - 2)
            batch = {**batch, "data": data * keep.view(view).to(data.dtype)}
        with self.modalities_dropped(keep, batch):
            return super().train_step(batch)

    @contextmanager
    def modalities_dropped(self, keep: torch.Tensor, batch: dict) -> Iterator[None]:
        """Runs around nnU-Net's `train_step`; `keep` is the (B, C) bool mask of the channels kept."""
        yield


class nnUNetTrainerChannelDropout(AtomicCheckpoints, ModalityDropout, nnUNetTrainer):
    """nnU-Net's default trainer and network, trained with modality dropout (zero-filled channels).

    The strong simple baseline for missing modalities: at inference a missing channel is zero-filled
    (`moe_nnunet predict`), which is what the network saw during training.
    """
    supports_missing_modalities = "zero_fill"
