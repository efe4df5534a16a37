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
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

__all__ = ["InputCase", "scan_input_folder", "resolve_channels", "MissingModalityPredictor", "missing_mode",
           "MissingModalityError"]


class MissingModalityError(ValueError):
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
        MissingModalityError: the folder holds no such files, or a channel index beyond the model's channels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingModalityError(f"input folder {folder} does not exist.")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    found: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = str(folder / name)
    if not found:
        raise MissingModalityError(f"no images named CASE_XXXX{file_ending} in {folder}; nnU-Net's input format "
                                   f"is one file per channel, e.g. case001_0000{file_ending}.")
    cases = []
    for case_id, channels in found.items():
        extra = sorted(c for c in channels if c >= num_channels)
        if extra:
            raise MissingModalityError(
                f"{channels[extra[0]]}: channel {extra[0]:04d} does not exist for this model, which has "
                f"{num_channels} channel(s) (_0000 to _{num_channels - 1:04d}); remove or rename the file.")
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


def write_placeholder(reference_file: str, path: str) -> None:
    """A zero image on the grid (size, spacing, origin, direction) of `reference_file`."""
    import SimpleITK as sitk
    try:
        ref = sitk.ReadImage(reference_file)
    except RuntimeError as e:
        raise MissingModalityError(f"{reference_file}: cannot read it with SimpleITK to stand in for a missing "
                                   f"channel ({e}); missing-modality prediction needs formats SimpleITK reads "
                                   f"(.nii.gz, .nrrd, .mha).") from e
    zero = sitk.Image(ref.GetSize(), sitk.sitkFloat32)
    zero.CopyInformation(ref)
    sitk.WriteImage(zero, path)


def complete_file_lists(cases: Sequence[InputCase], file_ending: str, tmp_dir: str) -> list[list[str]]:
    """Per case, a full channel list: the user's files, and placeholders for the absent ones."""
    lists = []
    for case in cases:
        present = [f for f in case.files if f is not None]
        files = []
        for c, f in enumerate(case.files):
            if f is None:
                f = os.path.join(tmp_dir, f"{case.case_id}_{c:04d}{file_ending}")
                write_placeholder(present[0], f)
            files.append(f)
        lists.append(files)
    return lists


def predict_with_missing(predictor: MissingModalityPredictor, trainer_class: type | None, input_folder: str,
                         output_folder: str, missing: Sequence[str] = (), zero_fill: bool = False,
                         save_probabilities: bool = False, overwrite: bool = True,
                         num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                         folder_with_segs_from_prev_stage: str | None = None, num_parts: int = 1,
                         part_id: int = 0) -> dict[tuple[int, ...], list[str]]:
    """Predict every case of `input_folder` into `output_folder`; returns {missing channels: case ids}.

    Cases lacking channel files, and all cases for channels named in `missing`, are predicted without
    those channels. Raises `MissingModalityError` (before predicting anything) when the model cannot.
    """
    dataset_json = predictor.dataset_json
    ending = dataset_json["file_ending"]
    channel_names = dataset_json["channel_names"]
    cases = scan_input_folder(input_folder, ending, len(channel_names))[part_id::num_parts]
    forced = resolve_channels(missing, channel_names)
    for case in cases:
        case.missing |= forced
        if len(case.missing) == len(channel_names):
            raise MissingModalityError(f"case {case.case_id}: every channel is missing; at least one modality "
                                       f"must be given.")
    mode = "zero_fill" if zero_fill else missing_mode(predictor.network, trainer_class)
    lacking = [c for c in cases if c.missing - forced]
    if lacking and mode is None:
        case = lacking[0]
        c = min(case.missing - forced)
        raise MissingModalityError(
            f"{os.path.join(input_folder, f'{case.case_id}_{c:04d}{ending}')} is missing "
            f"(channel {channel_names[str(c)]}), and this model ({predictor.trainer_name}) was not trained to "
            f"predict without it. Provide the file, use a model that handles missing modalities "
            f"(nnUNetTrainerM4oE, nnUNetTrainerChannelDropout), or pass --zero_fill to fill it with zeros "
            f"(usually much less accurate for a model trained on complete inputs).")
    if forced and mode is None:
        raise MissingModalityError(
            f"--missing {' '.join(missing)}: this model ({predictor.trainer_name}) was not trained to predict "
            f"without a modality; add --zero_fill to zero-fill it anyway.")

    groups: dict[tuple[int, ...], list[InputCase]] = {}
    for case in cases:
        groups.setdefault(tuple(sorted(case.missing)), []).append(case)
    os.makedirs(output_folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moe_nnunet_missing_") as tmp:
        for absent, group in sorted(groups.items()):
            predictor.missing_channels = set(absent)
            if absent:
                names = ", ".join(channel_names[str(c)] for c in absent)
                print(f"{len(group)} case(s) without {names}: "
                      f"{'experts masked' if mode == 'mask' else 'zero-filled'}")
            inputs = complete_file_lists(group, ending, tmp)
            outputs = [os.path.join(output_folder, c.case_id) for c in group]
            if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
                predictor.predict_from_files_sequential(
                    inputs, outputs, save_probabilities=save_probabilities, overwrite=overwrite,
                    folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
            else:
                predictor.predict_from_files(
                    inputs, outputs, save_probabilities=save_probabilities, overwrite=overwrite,
                    num_processes_preprocessing=num_processes_preprocessing,
                    num_processes_segmentation_export=num_processes_segmentation_export,
                    folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
    predictor.missing_channels = set()
    return {absent: [c.case_id for c in group] for absent, group in groups.items()}
