"""Where `moe_nnunet plan` and `moe_nnunet merge` write plans: never over nnU-Net's own plans or a dataset's
other files, over other plans only when asked (`--overwrite`), and nothing left behind by a run that fails."""
from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["NNUNET_PLANS", "NOT_PLANS_FILES", "PlansFileError", "plans_target", "nothing_new_on_failure"]

# plans identifiers of nnU-Net's own planners (nnUNetv2_plan_and_preprocess, its ResEnc presets)
NNUNET_PLANS = ("nnUNetPlans", "nnUNetResEncUNetPlans", "nnUNetResEncUNetMPlans", "nnUNetResEncUNetLPlans",
                "nnUNetResEncUNetXLPlans")
# the other json files of a preprocessed dataset folder
NOT_PLANS_FILES = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}


class PlansFileError(ValueError):
    """A plans name that moe_nnunet will not write (says why and what to do)."""


def plans_target(preprocessed_dataset: str | os.PathLike, plans_name: str, overwrite: bool, option: str) -> Path:
    """The plans file `<preprocessed_dataset>/<plans_name>.json` to write, checked before anything is written.

    Args:
        option: the command's option naming the plans (for the message), e.g. "-o".

    Raises:
        PlansFileError: the name is not a plain identifier, is nnU-Net's own plans or another file of the
            dataset (refused even with `overwrite`), or names existing plans and `overwrite` is False.
    """
    path = Path(preprocessed_dataset) / f"{plans_name}.json"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", plans_name):
        raise PlansFileError(f"{option} {plans_name}: a plans identifier is a plain name (letters, digits, '_', "
                             f"'-'), without a folder or .json, e.g. nnUNetMergedPlans.")
    if plans_name in NNUNET_PLANS or path.name in NOT_PLANS_FILES:
        what = "nnU-Net's own plans" if plans_name in NNUNET_PLANS else "a dataset file nnU-Net needs"
        raise PlansFileError(f"{option} {plans_name} would write {path}, {what}; moe_nnunet never writes it, "
                             f"even with --overwrite. Choose another name, e.g. {plans_name}_moe.")
    if path.exists() and not overwrite:
        raise PlansFileError(f"{path} already exists and nothing was written; pass --overwrite to replace it (models "
                             f"trained on these plans then no longer match them), or choose another name with "
                             f"{option}.")
    return path


@contextmanager
def nothing_new_on_failure(folder: str | os.PathLike) -> Iterator[None]:
    """On an exception, remove what was created in `folder` meanwhile (the folder itself if it is new)."""
    folder = Path(folder)
    before = set(os.listdir(folder)) if folder.is_dir() else None
    try:
        yield
    except BaseException:
        if before is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for name in set(os.listdir(folder)) - before:
                path = folder / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
