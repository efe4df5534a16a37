"""Checkpoints that survive a kill, and checkpoint errors that say what to do.

nnU-Net writes `checkpoint_latest.pth` / `checkpoint_best.pth` / `checkpoint_final.pth` with one
`torch.save` straight onto the file: a training killed during that write (a cluster's time limit, an
out-of-memory kill) leaves a truncated checkpoint, and `nnUNetv2_train --c` then fails on it. Here every
checkpoint is written to `<name>.partial` in the same folder, flushed to disk, and renamed over the old
one (`os.replace` is atomic on POSIX file systems), so the file is always either the previous complete
checkpoint or the new complete one.
"""
from __future__ import annotations

import os
from typing import Union

import torch

PARTIAL_SUFFIX = ".partial"  # a checkpoint being written: FILE.partial, renamed to FILE when complete

__all__ = ["AtomicCheckpoints", "load_checkpoint_file", "UnreadableCheckpointError"]


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that torch cannot read (names the file and the fix)."""


def _fsync_and_replace(tmp: str, filename: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, filename)


def load_checkpoint_file(filename: Union[str, os.PathLike], map_location=None, fix: str = "") -> dict:
    """`torch.load` of an nnU-Net checkpoint, raising `UnreadableCheckpointError` (file, cause, `fix`) when
    the file is truncated, corrupted or not a checkpoint."""
    filename = os.fspath(filename)
    try:
        checkpoint = torch.load(filename, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise UnreadableCheckpointError(
            f"checkpoint {filename} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it is "
            f"truncated or corrupted. {fix}".rstrip()) from e
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise UnreadableCheckpointError(f"{filename} is not an nnU-Net checkpoint (no 'network_weights'). {fix}"
                                        .rstrip())
    return checkpoint


class AtomicCheckpoints:
    """Trainer mixin: atomic checkpoint writes (see the module docstring), and a clear error naming the file
    and the way out when `--c`, `--val` or `--val_best` meets a damaged checkpoint."""

    def save_checkpoint(self, filename: str) -> None:
        tmp = filename + PARTIAL_SUFFIX
        if os.path.exists(tmp):
            os.remove(tmp)  # left by a save that was killed
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):  # not on other DDP ranks, nor with --disable_checkpointing
            _fsync_and_replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if isinstance(filename_or_checkpoint, str):
            name = os.path.basename(filename_or_checkpoint)
            others = [n for n in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
                      if n != name and os.path.isfile(os.path.join(os.path.dirname(filename_or_checkpoint), n))]
            fix = (f"Move it aside; nnUNetv2_train --c then continues from {others[0]}" if others else
                   "Move it aside and train this fold again (nnUNetv2_train without --c)") + \
                " (or restore it from a copy)."
            load_checkpoint_file(filename_or_checkpoint, map_location="cpu", fix=fix)  # readable? (read twice:
            # nnU-Net's load_checkpoint cannot take the loaded dict)
        super().load_checkpoint(filename_or_checkpoint)
