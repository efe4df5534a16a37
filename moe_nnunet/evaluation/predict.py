"""Prediction with missing modalities, on top of nnU-Net's `nnUNetPredictor`.

nnU-Net fuses the channels at the input, so a case lacking a channel file cannot be predicted with its
stock tools. Here, cases are grouped by the channels they lack, and each group runs through nnU-Net's own
predictor (preprocessing, sliding window, mirroring, fold ensembles, export) with:

* M4oE models (`supports_missing_modalities = "mask"`): the experts of the missing modalities masked
  before the gate's softmax (and not computed);
* models trained for zero-filled channels (`"zero_fill"`, e.g. `nnUNetTrainerChannelDropout`), or any
  model when the user asks with `zero_fill=True`: the channel set to 0 after nnU-Net's normalisation.

A missing channel file is stood in for by a zero image on the grid of a present channel, so that
nnU-Net's preprocessing runs unchanged; its values never reach the network (masked or zeroed after
normalisation).

Before anything is written, every input case is checked (`moe_nnunet.workflow.integrity`: complete gzip
streams, readable images, finite values, one grid per case) and existing predictions are refused unless they
are to be overwritten or skipped. Each prediction is written under a temporary name in the output folder and
renamed when complete (`AtomicExportPlansManager`), so a stopped run never leaves a truncated prediction.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from moe_nnunet.workflow.integrity import (BadInputError, check_cases, check_file, extra_channel_problem,
                                           group_channel_files, raise_problems)

__all__ = ["InputCase", "scan_input_folder", "resolve_channels", "MissingModalityPredictor", "missing_mode",
           "MissingModalityError", "BadInputError", "ExistingPredictionsError", "AtomicExportPlansManager",
           "predict_with_missing", "EXISTING"]

PARTIAL_PREFIX = ".moe_nnunet_partial-"  # a prediction being written; renamed to its own name when complete
EXISTING = ("refuse", "overwrite", "continue")


class MissingModalityError(BadInputError):
    """An input the model cannot predict (names the file and the fix)."""


@dataclass
class InputCase:
    """One case of the input folder: its channel files (None where missing) and the channels to leave out."""
    case_id: str
    files: list[str | None]
    missing: set[int] = field(default_factory=set)


def scan_input_folder(folder: str | os.PathLike, file_ending: str, num_channels: int) -> list[InputCase]:
    """Cases of an nnU-Net input folder (`CASE_XXXX<file_ending>`), tolerating absent channel files.

    Raises:
        MissingModalityError: the folder holds no such files, or channel files beyond the model's channels (all
            of them are named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingModalityError(f"input folder {folder} does not exist.")
    found, _ = group_channel_files(folder, file_ending)
    if not found:
        raise MissingModalityError(f"no images named CASE_XXXX{file_ending} in {folder}; nnU-Net's input format "
                                   f"is one file per channel, e.g. case001_0000{file_ending}.")
    raise_problems([extra_channel_problem(channels[c], c, num_channels, "this model")
                    for channels in found.values() for c in sorted(channels) if c >= num_channels],
                   f"{folder} holds channel files the model does not read; nothing was predicted",
                   MissingModalityError)
    cases = []
    for case_id, channels in found.items():
        files = [channels.get(c) for c in range(num_channels)]
        cases.append(InputCase(case_id, files, {c for c, f in enumerate(files) if f is None}))
    return cases


def resolve_channels(names: Sequence[str], channel_names: dict) -> set[int]:
    """Channel indices for names or indices given on the command line (`T2`, `1`, `0001`)."""
    by_name = {str(v).lower(): int(k) for k, v in channel_names.items()}
    out = set()
    for n in names:
        if n.lower() in by_name:
            out.add(by_name[n.lower()])
        elif n.isdigit() and int(n) < len(channel_names):
            out.add(int(n))
        else:
            raise MissingModalityError(f"--missing {n}: no such channel; the model's channels are " +
                                       ", ".join(f"{int(k):04d}={v}" for k, v in sorted(channel_names.items(),
                                                                                      key=lambda kv: int(kv[0]))))
    return out


def missing_mode(network: torch.nn.Module, trainer_class: type | None) -> str | None:
    """"mask", "zero_fill" or None: how a model copes with a missing modality."""
    mode = getattr(trainer_class, "supports_missing_modalities", None)
    if mode is None and hasattr(network, "experts_present"):
        mode = "mask"
    return mode


class MissingModalityPredictor(nnUNetPredictor):
    """`nnUNetPredictor` that predicts with some channels missing (`missing_channels`, set per group of cases).

    Masks the experts of M4oE models; zero-fills the channels (after nnU-Net's normalisation) otherwise.
    Everything else is nnU-Net's predictor.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.missing_channels: set[int] = set()

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        if not self.missing_channels:
            return super().predict_sliding_window_return_logits(input_image)
        input_image = input_image.clone()
        input_image[sorted(self.missing_channels)] = 0
        context = nullcontext()
        if hasattr(self.network, "experts_present"):
            keep = torch.ones(input_image.shape[0], dtype=torch.bool)
            keep[sorted(self.missing_channels)] = False
            context = self.network.experts_present(self.network.experts_present_for_channels(keep).to(self.device))
        with context:
            return super().predict_sliding_window_return_logits(input_image)


def _read_sitk(path: str, purpose: str):
    import SimpleITK as sitk
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise MissingModalityError(f"{path}: cannot read it with SimpleITK {purpose} ({e}); this needs formats "
                                   f"SimpleITK reads (.nii.gz, .nrrd, .mha).") from e


def write_placeholder(reference_file: str, path: str) -> None:
    """A zero image on the grid (size, spacing, origin, direction) of `reference_file`."""
    import SimpleITK as sitk
    ref = _read_sitk(reference_file, "to stand in for a missing channel")
    zero = sitk.Image(ref.GetSize(), sitk.sitkFloat32)
    zero.CopyInformation(ref)
    sitk.WriteImage(zero, path)


def write_finite_copy(source: str, path: str) -> None:
    """`source` with its NaN and inf voxels set to 0 (same grid and pixel type)."""
    import numpy as np
    import SimpleITK as sitk
    image = _read_sitk(source, "to replace its non-finite values (--allow_nonfinite)")
    values = np.nan_to_num(sitk.GetArrayFromImage(image), nan=0, posinf=0, neginf=0)
    finite = sitk.GetImageFromArray(values, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    finite.CopyInformation(image)
    sitk.WriteImage(finite, path)


def complete_file_lists(cases: Sequence[InputCase], file_ending: str, tmp_dir: str,
                        replaced: dict[str, str] | None = None) -> list[list[str]]:
    """Per case, a full channel list: the user's files (or their `replaced` copies), and placeholders for the
    absent ones."""
    replaced = replaced or {}
    lists = []
    for case in cases:
        present = [f for f in case.files if f is not None]
        files = []
        for c, f in enumerate(case.files):
            if f is None:
                f = os.path.join(tmp_dir, f"{case.case_id}_{c:04d}{file_ending}")
                write_placeholder(present[0], f)
            files.append(replaced.get(f, f))
        lists.append(files)
    return lists


# ---------------------------------------------------------------------------------------- atomic export


def _finish_partial(output_fname: str, endings: Sequence[str]) -> None:
    """Rename a complete prediction written as `PARTIAL_PREFIX<case><ending>` (and the .npz/.pkl/.json nnU-Net
    wrote for it before) to its own name, the segmentation last."""
    folder, name = os.path.split(output_fname)
    if not name.startswith(PARTIAL_PREFIX):
        return
    ending = max((e for e in endings if name.endswith(e)), key=len, default=os.path.splitext(name)[1])
    stem = name[:len(name) - len(ending)]
    for companion in (".npz", ".pkl", ".json"):
        if os.path.isfile(os.path.join(folder, stem + companion)):
            os.replace(os.path.join(folder, stem + companion),
                       os.path.join(folder, stem[len(PARTIAL_PREFIX):] + companion))
    os.replace(output_fname, os.path.join(folder, name[len(PARTIAL_PREFIX):]))


@lru_cache(maxsize=None)
def atomic_writer(base: type) -> type:
    """`base` (an nnU-Net reader/writer class) whose `write_seg` renames a `PARTIAL_PREFIX` file when written."""
    def write_seg(self, seg, output_fname: str, properties: dict) -> None:
        base.write_seg(self, seg, output_fname, properties)
        _finish_partial(output_fname, getattr(self, "supported_file_endings", ()))
    return type(f"Atomic{base.__name__}", (base,), {"write_seg": write_seg, "__module__": __name__})


class AtomicExportPlansManager(PlansManager):
    """nnU-Net's `PlansManager` whose image writer finishes predictions written under `PARTIAL_PREFIX` names by
    renaming them: the predictor's export (in its worker processes too) then never leaves a partial file under a
    prediction's name. Reading is nnU-Net's reader, unchanged."""

    @property
    def image_reader_writer_class(self):
        return atomic_writer(super().image_reader_writer_class)


# ---------------------------------------------------------------------------------------- output folder


class ExistingPredictionsError(BadInputError):
    """The output folder holds predictions that would be overwritten."""


def _prediction_files(output_folder: str, case_id: str, ending: str, save_probabilities: bool) -> list[str]:
    names = [case_id + ending] + ([case_id + ".npz", case_id + ".pkl"] if save_probabilities else [])
    return [os.path.join(output_folder, n) for n in names]


def _unfinished(files: Sequence[str], reader_class: type) -> str | None:
    """Why an earlier prediction (its segmentation, then .npz and .pkl) is not complete; None if it is."""
    for f in files:
        if not os.path.isfile(f) or os.path.getsize(f) == 0:
            return f"{f} is {'empty' if os.path.isfile(f) else 'missing'}"
    problem = check_file(files[0], reader_class, values=False).problem
    if problem:
        return f"{files[0]} {problem.split(';')[0]}"
    if len(files) > 1:
        try:
            with zipfile.ZipFile(files[1]) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            bad = str(e)
        if bad:
            return f"{files[1]} is not a complete .npz ({bad})"
    return None


def _select_cases(cases: list[InputCase], output_folder: str, ending: str, save_probabilities: bool,
                  existing: str, reader_class: type) -> list[InputCase]:
    """The cases to predict: all (`overwrite`), those without a complete prediction (`continue`), or all if none
    has a prediction (`refuse`; else ExistingPredictionsError listing the files)."""
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {EXISTING}, got {existing!r}")
    if existing == "overwrite" or not os.path.isdir(output_folder):
        return cases
    if existing == "refuse":
        present = [f for c in cases for f in _prediction_files(output_folder, c.case_id, ending, save_probabilities)
                   if os.path.lexists(f)]
        raise_problems(present, f"{output_folder} already holds predictions of these cases, and nothing was written. "
                                f"Pass --overwrite to replace them, --continue_prediction to predict only the cases "
                                f"without a complete prediction, or choose another output folder",
                       ExistingPredictionsError, noun="file(s) that would be overwritten")
        return cases
    todo = []
    for case in cases:
        files = _prediction_files(output_folder, case.case_id, ending, save_probabilities)
        reason = _unfinished(files, reader_class) if os.path.lexists(files[0]) else None
        if reason:
            print(f"{reason}: predicting {case.case_id} again")
        if reason or not os.path.lexists(files[0]):
            todo.append(case)
    if len(todo) < len(cases):
        print(f"{len(cases) - len(todo)} case(s) already predicted in {output_folder}: skipped (--continue_prediction)")
    return todo


def _remove_partial_files(output_folder: str) -> None:
    """Predictions a stopped run left half-written (only ours: `PARTIAL_PREFIX` names)."""
    for name in os.listdir(output_folder):
        if name.startswith(PARTIAL_PREFIX):
            os.remove(os.path.join(output_folder, name))


# ---------------------------------------------------------------------------------------- prediction


def _check_channels(cases: Sequence[InputCase], forced: set[int], missing: Sequence[str], mode: str | None,
                    input_folder: str, ending: str, channel_names: dict, trainer_name: str) -> None:
    """MissingModalityError naming every case the model cannot predict for the channels it lacks."""
    problems = [f"case {c.case_id}: every channel is missing; at least one modality must be given"
                for c in cases if len(c.missing) == len(channel_names)]
    if mode is None:
        problems += [
            f"{os.path.join(input_folder, f'{case.case_id}_{c:04d}{ending}')} is missing (channel "
            f"{channel_names[str(c)]}), and this model ({trainer_name}) was not trained to predict without it. "
            f"Provide the file, use a model that handles missing modalities (nnUNetTrainerM4oE, "
            f"nnUNetTrainerChannelDropout), or pass --zero_fill to fill it with zeros (usually much less accurate "
            f"for a model trained on complete inputs)"
            for case in cases for c in sorted(case.missing - forced)]
        if forced:
            problems.append(f"--missing {' '.join(missing)}: this model ({trainer_name}) was not trained to "
                            f"predict without a modality; add --zero_fill to zero-fill it anyway")
    if len(problems) == 1:
        raise MissingModalityError(problems[0] + ".")
    raise_problems(problems, "the model cannot predict these cases; nothing was predicted", MissingModalityError)


def _check_inputs(cases: Sequence[InputCase], reader_class: type, allow_nonfinite: bool, num_processes: int,
                  tmp_dir: str) -> dict[str, str]:
    """Check every present channel file of `cases`; BadInputError listing all problems. Returns the finite copies
    (original -> copy in `tmp_dir`) that stand in for files with NaN or inf under `allow_nonfinite`."""
    checks, problems = check_cases([[f for f in c.files if f is not None] for c in cases], reader_class,
                                   num_processes, allow_nonfinite)
    raise_problems(problems, "input files that cannot be predicted as they are; nothing was predicted or written")
    replaced = {}
    for check in checks.values():
        if check.nonfinite:
            replaced[check.path] = os.path.join(tmp_dir, f"finite_{len(replaced)}_{os.path.basename(check.path)}")
            write_finite_copy(check.path, replaced[check.path])
            print(f"{check.path}: {check.nonfinite} non-finite voxel(s) (NaN or inf) set to 0 (--allow_nonfinite)")
    return replaced


def predict_with_missing(predictor: MissingModalityPredictor, trainer_class: type | None, input_folder: str,
                         output_folder: str, missing: Sequence[str] = (), zero_fill: bool = False,
                         save_probabilities: bool = False, existing: str = "refuse", allow_nonfinite: bool = False,
                         check_inputs: bool = True,
                         num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                         folder_with_segs_from_prev_stage: str | None = None, num_parts: int = 1,
                         part_id: int = 0) -> dict[tuple[int, ...], list[str]]:
    """Predict every case of `input_folder` into `output_folder`; returns {missing channels: case ids}.

    Cases lacking channel files, and all cases for channels named in `missing`, are predicted without
    those channels. Before anything is written, every case is checked (MissingModalityError when the model
    cannot predict it, BadInputError for unreadable, truncated or non-finite files and channels on different
    grids: all problems at once) and existing predictions are handled as `existing` says: "refuse"
    (ExistingPredictionsError listing them), "overwrite", or "continue" (skip the complete ones). With
    `allow_nonfinite`, NaN and inf voxels are set to 0 instead of refused. `check_inputs=False` skips the file
    checks, for inputs an earlier call has checked.
    """
    dataset_json = predictor.dataset_json
    ending = dataset_json["file_ending"]
    channel_names = dataset_json["channel_names"]
    cases = scan_input_folder(input_folder, ending, len(channel_names))[part_id::num_parts]
    forced = resolve_channels(missing, channel_names)
    for case in cases:
        case.missing |= forced
    mode = "zero_fill" if zero_fill else missing_mode(predictor.network, trainer_class)
    _check_channels(cases, forced, missing, mode, input_folder, ending, channel_names, predictor.trainer_name)
    reader_class = predictor.plans_manager.image_reader_writer_class
    cases = _select_cases(cases, output_folder, ending, save_probabilities, existing, reader_class)

    groups: dict[tuple[int, ...], list[InputCase]] = {}
    for case in cases:
        groups.setdefault(tuple(sorted(case.missing)), []).append(case)
    plans_manager = predictor.plans_manager
    with tempfile.TemporaryDirectory(prefix="moe_nnunet_missing_") as tmp:
        replaced = _check_inputs(cases, reader_class, allow_nonfinite, num_processes_preprocessing, tmp) \
            if check_inputs else {}
        inputs_of = {absent: complete_file_lists(group, ending, tmp, replaced) for absent, group in groups.items()}
        if cases:
            os.makedirs(output_folder, exist_ok=True)
            _remove_partial_files(output_folder)
        predictor.plans_manager = AtomicExportPlansManager(plans_manager.plans)
        try:
            for absent, group in sorted(groups.items()):
                predictor.missing_channels = set(absent)
                if absent:
                    names = ", ".join(channel_names[str(c)] for c in absent)
                    print(f"{len(group)} case(s) without {names}: "
                          f"{'experts masked' if mode == 'mask' else 'zero-filled'}")
                inputs = inputs_of[absent]
                outputs = [os.path.join(output_folder, PARTIAL_PREFIX + c.case_id) for c in group]
                if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
                    predictor.predict_from_files_sequential(
                        inputs, outputs, save_probabilities=save_probabilities, overwrite=True,
                        folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
                else:
                    predictor.predict_from_files(
                        inputs, outputs, save_probabilities=save_probabilities, overwrite=True,
                        num_processes_preprocessing=num_processes_preprocessing,
                        num_processes_segmentation_export=num_processes_segmentation_export,
                        folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
        finally:
            predictor.plans_manager = plans_manager
            predictor.missing_channels = set()
    return {absent: [c.case_id for c in group] for absent, group in groups.items()}
