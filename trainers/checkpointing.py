"""Checkpoints that survive a kill, and checkpoint errors that say what to do.

nnU-Net writes `checkpoint_latest.pth` / `checkpoint_best.pth` / `checkpoint_final.pth` with one
`torch.save` straight onto the file: a training killed during that write (a cluster's time limit, an
out-of-memory kill) leaves a truncated checkpoint, and `nnUNetv2_train --c` then fails on it. Here every
checkpoint is written to `<name>.partial` in the same folder, flushed to disk, and renamed over the old
one (`os.replace` is atomic on POSIX file systems), so the file is always either the previous complete
checkpoint or the new complete one.

Every checkpoint moe_nnunet reads goes through `load_checkpoint_file`, with `torch.load(weights_only=True)`: a
checkpoint is a pickle, and unpickling anything beyond tensors, numbers and containers can run code from the
file. The only extra types allowed are numpy's scalars, which nnU-Net's trainer puts in its logging lists.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Union

import numpy as np
import torch

PARTIAL_SUFFIX = ".partial"  # a checkpoint being written: FILE.partial, renamed to FILE when complete

__all__ = ["AtomicCheckpoints", "load_checkpoint_file", "UnreadableCheckpointError", "UntrustedCheckpointError"]


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that torch cannot read (names the file and the fix)."""


class UntrustedCheckpointError(UnreadableCheckpointError):
    """A checkpoint holding pickled objects that `weights_only=True` refuses (names the file, them and the way
    on)."""


def _numpy_scalar_globals() -> list:
    """The allow-list for numpy scalars (np.float64(0.8) pickles as `scalar(dtype, bytes)`), under the names of
    numpy 2 (`numpy._core`) and numpy 1 (`numpy.core`), which wrote older checkpoints."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(t)) for t in (np.bool_, np.int32, np.int64, np.float16, np.float32, np.float64)}
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *(d for d in dtypes if d is not np.dtype)]  # numpy >= 1.25: numpy.dtypes.Float64DType, ...


def _refused_objects(filename: str, error: pickle.UnpicklingError) -> str:
    """The pickled objects `weights_only=True` refused in `filename` ('' when it refused a damaged pickle)."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(filename))
    except Exception:  # not a zip checkpoint: torch's message names the first object
        names = ""
    message = str(error).split("WeightsUnpickler error:")[-1].strip()
    if not names and "Can only build" in message:
        names = message.splitlines()[0][:200]
    return names or ", ".join(re.findall(r"GLOBAL (\S+)", message))


def _refused(filename: str, names: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"checkpoint {filename} was not loaded: it contains pickled objects beyond tensors and numbers ({names}), "
        f"and unpickling them would run code from the file. Only load checkpoints you trust. If you trust its "
        f"source (you trained it, or got it from someone you trust), save it again without those objects: "
        f"torch.load(..., weights_only=False), replace them by dicts, lists, strings, numbers or tensors, "
        f"torch.save. Otherwise do not use this model: nnU-Net's own commands (nnUNetv2_predict, "
        f"nnUNetv2_train --c) would run that code without asking.")


def _fsync_and_replace(tmp: str, filename: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, filename)


def load_checkpoint_file(filename: Union[str, os.PathLike], map_location=None, fix: str = "",
                         mmap: bool = False) -> dict:
    """`torch.load(weights_only=True)` of an nnU-Net checkpoint (numpy scalars allowed, nothing else beyond
    torch's own list).

    Raises:
        UntrustedCheckpointError: the file holds other pickled objects (names the file, them and what to do).
        UnreadableCheckpointError: the file is truncated, corrupted or not a checkpoint (with `fix` appended).
    """
    filename = os.fspath(filename)
    if not hasattr(torch.serialization, "safe_globals"):
        raise UnreadableCheckpointError(f"checkpoint {filename} not loaded: reading nnU-Net checkpoints safely "
                                        f"(weights_only=True with numpy scalars) needs torch >= 2.5; this is "
                                        f"{torch.__version__}. Upgrade torch.")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            checkpoint = torch.load(filename, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        names = _refused_objects(filename, e)
        raise (_refused(filename, names) if names else _unreadable(filename, e, fix)) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise _unreadable(filename, e, fix) from e
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise UnreadableCheckpointError(f"{filename} is not an nnU-Net checkpoint (no 'network_weights'). {fix}"
                                        .rstrip())
    return checkpoint


def _unreadable(filename: str, error: Exception, fix: str) -> UnreadableCheckpointError:
    cause = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()
    return UnreadableCheckpointError(
        f"checkpoint {filename} cannot be read ({type(error).__name__}: {cause[0][:200] if cause else ''}); it "
        f"is truncated or corrupted. {fix}".rstrip())


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
