"""Let nnU-Net's stock commands find our trainers through `nnUNet_extTrainer`, without importing them twice.

nnU-Net (2.8+) imports every module in each `nnUNet_extTrainer` folder as a *top-level* module. Pointing it
at our `trainers/` source folder would create a second copy of each class (`m4oe.nnUNetTrainerM4oE` next to
`moe_nnunet.trainers.m4oe.nnUNetTrainerM4oE`), which breaks isinstance checks and pickling. Instead we keep
a folder outside site-packages holding one small module that re-exports the installed classes, so the
lookup always returns the single canonical class object.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ext_trainer_dir", "ensure_ext_trainer_env"]

SHIM_NAME = "moe_nnunet_trainers.py"
SHIM_SOURCE = '''"""Written by `moe_nnunet trainer_path`: re-exports the trainers of the installed moe_nnunet package so
that nnU-Net's `nnUNet_extTrainer` lookup finds them under their one canonical module."""
from moe_nnunet.trainers import *  # noqa: F401,F403
'''


def _home() -> Path:
    if os.environ.get("MOE_NNUNET_HOME"):
        return Path(os.environ["MOE_NNUNET_HOME"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "moe_nnunet"


def ext_trainer_dir() -> Path:
    """The folder to put in `nnUNet_extTrainer`; created (or refreshed) on every call."""
    folder = _home() / "nnunet_ext_trainers"
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / SHIM_NAME
    if not shim.is_file() or shim.read_text() != SHIM_SOURCE:
        tmp = shim.with_suffix(".tmp")
        tmp.write_text(SHIM_SOURCE)
        tmp.replace(shim)
    return folder


def ensure_ext_trainer_env() -> str:
    """Add our folder to `nnUNet_extTrainer` in this process (for our own commands that call nnU-Net)."""
    folder = str(ext_trainer_dir())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])
    return os.environ["nnUNet_extTrainer"]
