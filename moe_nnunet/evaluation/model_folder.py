"""Checks of a trained model folder before prediction: each problem is reported with what to do about it,
before anything is written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

from moe_nnunet.trainers.checkpointing import UnreadableCheckpointError, load_checkpoint_file

__all__ = ["ModelFolderError", "UnreadableCheckpointError", "check_model_folder", "ModelFolderName",
           "parse_model_folder_name"]


class ModelFolderError(ValueError):
    """A trained model that cannot be used as asked (names what is wrong and the fix)."""


class ModelFolderName(NamedTuple):
    trainer: str
    plans: str
    configuration: str


def parse_model_folder_name(name: str) -> ModelFolderName | None:
    """The parts of nnU-Net's name for a trained model folder, `TRAINER__PLANS__CONFIGURATION`; None for a name
    that is not one."""
    parts = name.split("__")
    return ModelFolderName(*parts) if len(parts) == 3 else None


def _trained_models(dataset_results: Path) -> list[str]:
    if not dataset_results.is_dir():
        return []
    return sorted(p.name for p in dataset_results.iterdir()
                  if p.is_dir() and parse_model_folder_name(p.name) is not None)


def check_model_folder(dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence,
                       checkpoint: str = "checkpoint_final.pth") -> str:
    """The model folder of (dataset, trainer, plans, configuration), checked for prediction with `folds`:
    the folder exists, and each fold has a readable `checkpoint`. Returns the folder.

    Raises:
        ModelFolderError: the model or one of its folds is missing, or a checkpoint cannot be read.
    """
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        folder = Path(get_output_folder(dataset, trainer, plans, configuration))
    except RuntimeError as e:  # unknown dataset
        raise ModelFolderError(str(e)) from e
    if not folder.is_dir():
        have = _trained_models(folder.parent)
        hint = (f"trained models of {folder.parent.name}: {', '.join(have)} (folder names are "
                f"TRAINER__PLANS__CONFIGURATION)" if have else
                f"nnUNet_results ({os.environ.get('nnUNet_results')}) holds no trained model of {folder.parent.name}")
        raise ModelFolderError(f"no trained model {folder.name} in {folder.parent}; check -tr {trainer}, -p {plans} "
                               f"and -c {configuration}: {hint}.")
    trained = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint).is_file())
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            others = [f for f in trained if f != str(fold)]
            raise ModelFolderError(
                f"fold {fold} of {folder} has no {checkpoint} ({path} is missing). Train it (nnUNetv2_train "
                f"{dataset} {configuration} {fold} -tr {trainer} -p {plans}), or predict with the folds that "
                f"are trained" + (f": -f {' '.join(others)}." if others else " (none are)."))
        load_checkpoint_file(path, map_location="cpu",
                             fix=f"Train fold {fold} again (nnUNetv2_train ... --c resumes it from its latest "
                                 f"checkpoint), install the model again from its zip, or leave the fold out (-f).")
    return str(folder)
