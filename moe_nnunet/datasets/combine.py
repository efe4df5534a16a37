"""Combine single-channel raw nnU-Net datasets of different modalities into one dataset with modality tags.

This is M4oE's cross-dataset setting: a CT dataset and an MRI dataset that annotate the same structures become
one nnU-Net dataset with one input channel, and the planner builds one expert per source modality. Each case
keeps its modality as a tag (dataset.json key ``"moe_nnunet"``, also written to ``modalities.json``), so
trainers know which expert a case belongs to during training. At inference no tag is needed: the gate routes
from image content.

* Labels are matched by name into the union of every dataset's labels (``rename`` maps a dataset's label to
  another name first; a name that appears in several datasets means the same structure). Datasets may annotate
  different subsets of the union (partial labels, M4oE's setting: CT and MRI datasets of different organs): each
  source then records the labels it annotates (``"annotated_labels"`` in the tags), and the M4oE trainers learn
  from a case only what its dataset annotates (`moe_nnunet.training.partial_labels`); a label its dataset does
  not annotate is never taken for background, nor scored on its cases.
* Images keep their original intensities and pixel type (the file is copied, or rewritten by SimpleITK only to
  change the file ending), and the combined channel is declared ``zscore``: nnU-Net normalises every case by its
  own mean and std, in preprocessing and again in ``nnUNetv2_predict``. That is the one normalisation nnU-Net
  can apply to a new image without knowing its modality, so a combined model predicts raw CT and MRI alike.
  The cost: CT loses its absolute Hounsfield scale (nnU-Net's CT scheme would need the modality at inference).
* Case ids get the modality tag as prefix (``CT_LungCTLesion_000``); labels are written with the image's
  spacing, origin and direction.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from moe_nnunet.datasets.common import dataset_folder_name, resolve_raw_root, same_geometry

__all__ = ["MODALITY_KEY", "TAG_FILE", "NORMALISATION", "combine_datasets", "read_modality_tags",
           "experts_from_dataset_json", "annotated_label_values", "parse_renames"]

MODALITY_KEY = "moe_nnunet"
TAG_FILE = "modalities.json"
# channel name nnU-Net maps to ZScoreNormalization (per case, whatever the modality; see
# nnunetv2/preprocessing/normalization/map_channel_name_to_normalization.py)
NORMALISATION = "zscore"
_SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
_TAG_PATTERN = r"[A-Za-z0-9][A-Za-z0-9\-]*"


@dataclass
class _Source:
    """One input dataset: where it is, its modality tag and what nnU-Net's helpers found in it."""

    tag: str
    folder: Path
    dataset_json: dict
    cases: dict[str, dict]          # case id -> {"images": [path], "label": path}
    labels: dict[str, int]          # foreground label name -> value

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def channel_name(self) -> str:
        return str(next(iter(self.dataset_json["channel_names"].values())))


# ----------------------------------------------------------------------------------------------------- reading


def _find_dataset(dataset: str | int, raw_root: Path) -> Path:
    """Raw folder of a dataset given by id or name: looked up in ``raw_root`` first, then as nnU-Net does."""
    text = str(dataset)
    if text.isdigit():
        found = sorted(p for p in raw_root.glob(f"Dataset{int(text):03d}_*") if p.is_dir())
    else:
        found = [raw_root / text] if (raw_root / text).is_dir() else []
    if len(found) > 1:
        raise ValueError(f"dataset id {text} is ambiguous in {raw_root}: {[p.name for p in found]}; give the name")
    if found:
        return found[0]
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(int(text) if text.isdigit() else text)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot find dataset {text!r} in {raw_root}: {e}") from None
    if not (raw_root / name).is_dir():
        raise ValueError(f"dataset {name} has no raw folder in {raw_root}; combine reads imagesTr, labelsTr and "
                         f"dataset.json from there")
    return raw_root / name


def _load_source(folder: Path, tag: str | None) -> _Source:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    json_file = folder / "dataset.json"
    if not json_file.is_file():
        raise ValueError(f"{folder.name}: no dataset.json in {folder}")
    dataset_json = json.loads(json_file.read_text(encoding="utf-8"))
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if len(channels) != 1:
        raise ValueError(f"{folder.name} has {len(channels)} channels ({channels}); combine takes single-channel "
                         f"datasets. Split it into one dataset per channel first (each with its own channel_names "
                         f"entry), then combine those.")
    dataset_json["channel_names"] = {"0": str(next(iter(channels.values())))}
    ending = dataset_json.get("file_ending")
    if ending not in _SITK_ENDINGS:
        raise ValueError(f"{folder.name}: file_ending {ending!r} is not supported; combine reads and writes "
                         f"images with SimpleITK as one of {', '.join(_SITK_ENDINGS)}. Convert the dataset first.")
    regions = {k: v for k, v in dataset_json.get("labels", {}).items() if isinstance(v, (list, tuple))}
    if regions or "regions_class_order" in dataset_json:
        raise ValueError(f"{folder.name} uses region-based labels ({regions or 'regions_class_order'}); combine "
                         f"maps plain integer labels by name. Use the dataset's plain label version.")
    labels = {str(k): int(v) for k, v in dataset_json.get("labels", {}).items() if int(v) != 0}
    cases = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    if not cases:
        raise ValueError(f"{folder.name}: no training cases found in {folder / 'imagesTr'}")
    tag = str(dataset_json["channel_names"]["0"]) if tag is None else str(tag)
    if not re.fullmatch(_TAG_PATTERN, tag):
        raise ValueError(f"{folder.name}: modality tag {tag!r} must be letters, digits or '-' (it prefixes case "
                         f"ids and names the expert); pass one with --modalities")
    return _Source(tag, folder, dataset_json, dict(sorted(cases.items())), labels)


def _check_tags(sources: Sequence[_Source]) -> None:
    seen: dict[str, str] = {}
    for s in sources:
        other = seen.setdefault(s.tag.casefold(), s.name)
        if other != s.name:
            raise ValueError(f"{other} and {s.name} have the same modality tag {s.tag!r}; tags must differ (one "
                             f"expert per tag). Pass distinct tags with --modalities (e.g. --modalities CT1 CT2), or "
                             f"merge two datasets of the same modality into one dataset first.")


def parse_renames(renames: Sequence[str]) -> list[tuple[str, str, str]]:
    """``DATASET:old=new`` strings as ``(dataset, old, new)``."""
    parsed = []
    for text in renames:
        dataset, sep, rest = str(text).partition(":")
        old, eq, new = rest.partition("=")
        if not (sep and eq and dataset and old and new) or new == "background":
            raise ValueError(f"--rename {text!r}: write DATASET:OLD=NEW, e.g. 3:tumour=lesion (the dataset as given "
                             f"with -d, a foreground label of its dataset.json, and the name it gets)")
        parsed.append((dataset, old, new))
    return parsed


def _apply_renames(sources: Sequence[_Source], given: Sequence[str | int],
                   renames: Sequence[tuple[str, str, str]]) -> None:
    """Rename labels of the sources (in memory; the source datasets are only read)."""
    for dataset, old, new in renames:
        matches = [s for s, g in zip(sources, given) if dataset in (str(g), s.name, s.name.split("_", 1)[-1])
                   or (dataset.isdigit() and s.name.startswith(f"Dataset{int(dataset):03d}_"))]
        if len(matches) != 1:
            raise ValueError(f"--rename {dataset}:{old}={new}: {dataset!r} names "
                             f"{'none' if not matches else 'several'} of the datasets to combine "
                             f"({', '.join(s.name for s in sources)})")
        source = matches[0]
        if old not in source.labels:
            raise ValueError(f"--rename {dataset}:{old}={new}: {source.name} has no label {old!r}; its labels are "
                             f"{sorted(source.labels)}")
        if new in source.labels and new != old:
            raise ValueError(f"--rename {dataset}:{old}={new}: {source.name} already has a label {new!r}; two labels "
                             f"of one dataset cannot become one")
        source.labels = {(new if k == old else k): v for k, v in source.labels.items()}


def _combined_labels(sources: Sequence[_Source]) -> dict[str, int]:
    """Union of the label names: background 0, then the first dataset's labels in its order, then each further
    dataset's new names in its order."""
    order: list[str] = []
    for s in sources:
        order += [name for name in sorted(s.labels, key=s.labels.get) if name not in order]
    return {"background": 0, **{name: i + 1 for i, name in enumerate(order)}}


def annotated_label_values(dataset_json: dict) -> dict[str, list[int]] | None:
    """For a combined dataset whose sources annotate different labels: {modality tag: the combined label values
    its source annotates, background included}; None when every case is annotated with every label."""
    tags = read_modality_tags(dataset_json)
    annotated = (tags or {}).get("annotated_labels")
    if not annotated:
        return None
    labels = dataset_json["labels"]
    return {tag: sorted({0, *(int(labels[name]) for name in names)}) for tag, names in annotated.items()}


# ----------------------------------------------------------------------------------------------------- writing


def _label_lookup(source: _Source, labels: dict[str, int]) -> np.ndarray:
    """Table source value -> combined value; -1 for values the source does not declare."""
    lut = np.full(max(source.labels.values(), default=0) + 1, -1, dtype=np.int64)
    lut[0] = 0
    for name, value in source.labels.items():
        lut[value] = labels[name]
    return lut


def _copy_image(source: _Source, case_id: str, target: Path) -> sitk.ImageFileReader:
    """Copy a case's image unchanged to ``target``; return its header (size, spacing, origin, direction)."""
    path = source.cases[case_id]["images"][0]
    header = sitk.ImageFileReader()
    header.SetFileName(path)
    header.ReadImageInformation()
    if header.GetNumberOfComponents() != 1:
        raise ValueError(f"{source.name}: case {case_id} has vector pixels; combine needs scalar images")
    if target.name.endswith(source.dataset_json["file_ending"]):
        shutil.copyfile(path, target)
    else:                               # another format: same pixels, pixel type and geometry
        sitk.WriteImage(sitk.ReadImage(path), str(target), useCompression=True)
    return header


def _write_source(source: _Source, out: Path, labels: dict[str, int], file_ending: str,
                  progress: bool) -> dict[str, str]:
    """Write every case of one source into ``out``; return {combined case id: tag}."""
    from tqdm import tqdm

    lut = _label_lookup(source, labels)
    label_type = sitk.sitkUInt8 if len(labels) <= 256 else sitk.sitkUInt16
    written = {}
    for case_id, files in tqdm(source.cases.items(), desc=source.tag, disable=not progress):
        new_id = f"{source.tag}_{case_id}"
        image = _copy_image(source, case_id, out / "imagesTr" / f"{new_id}_0000{file_ending}")
        label = sitk.ReadImage(files["label"])
        if not same_geometry(image, label, tol=1e-3):
            raise ValueError(f"{source.name}: case {case_id}: label geometry (size, spacing, origin, direction) "
                             f"differs from the image's; fix the source dataset (nnUNetv2_plan_and_preprocess "
                             f"--verify_dataset_integrity reports the same)")
        values = sitk.GetArrayFromImage(label)
        present = np.unique(values)
        undeclared = [v for v in present.tolist() if v != int(v) or not 0 <= v < len(lut) or lut[int(v)] < 0]
        if undeclared:
            raise ValueError(f"{source.name}: case {case_id} holds label values {undeclared} that its dataset.json "
                             f"does not declare ({source.labels}); fix the labels or dataset.json")
        out_label = sitk.Cast(sitk.GetImageFromArray(lut[values.astype(np.int64)]), label_type)
        # nnU-Net wants one geometry per case, to the last digit: the image's
        out_label.SetSpacing(image.GetSpacing())
        out_label.SetOrigin(image.GetOrigin())
        out_label.SetDirection(image.GetDirection())
        sitk.WriteImage(out_label, str(out / "labelsTr" / f"{new_id}{file_ending}"), useCompression=True)
        written[new_id] = source.tag
    return written


def _check_free(raw_root: Path, dataset_id: int, folder_name: str, overwrite: bool) -> None:
    """The output folder must be new (or, with `overwrite`, an earlier dataset of that name), and its id unused by
    another name under any of nnU-Net's three folders."""
    target = raw_root / folder_name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another id/name, or remove that folder or pass "
                              f"--overwrite to replace it if you mean to rebuild it (nothing was written)")
    if target.exists() and not (target / "dataset.json").is_file():
        raise FileExistsError(f"{target} exists but holds no dataset.json, so it is not a dataset to replace; "
                              f"--overwrite refuses to delete it. Move it away or choose another id/name")
    roots = {raw_root, *(Path(os.environ[v]) for v in ("nnUNet_preprocessed", "nnUNet_results")
                         if os.environ.get(v))}
    clashes = sorted(str(p) for root in roots if root.is_dir() for p in root.glob(f"Dataset{dataset_id:03d}_*")
                     if p.name != folder_name)
    if clashes:
        raise FileExistsError(f"dataset id {dataset_id} is already used by {clashes}; nnU-Net needs one name per "
                              f"id, choose another id")


def combine_datasets(datasets: Sequence[str | int], new_id: int, name: str,
                     modalities: Sequence[str] | None = None, raw_root: str | os.PathLike | None = None,
                     progress: bool = False, overwrite: bool = False, renames: Sequence[str] = ()) -> Path:
    """Build ``Dataset{new_id:03d}_{name}`` from single-channel datasets of different modalities.

    Args:
        datasets: two or more dataset ids or names (each with dataset.json, imagesTr, labelsTr in ``raw_root``).
        new_id: id of the new dataset (1..999, unused).
        name: name of the new dataset.
        modalities: one modality tag per dataset (default: each dataset's channel name); tags must differ.
        raw_root: folder holding the inputs and receiving the output (default: ``$nnUNet_raw``).
        progress: show a progress bar per dataset.
        overwrite: replace an existing dataset of the same id and name (swapped in once the new one is
            complete; never one of the inputs).
        renames: ``DATASET:OLD=NEW``: label OLD of that dataset (as given in ``datasets``) takes the name NEW
            before labels are matched by name.

    Returns:
        The new dataset's folder. Nothing is left behind if anything fails; inputs are only read.
    """
    root = resolve_raw_root(raw_root)
    if len(datasets) < 2:
        raise ValueError(f"give at least two datasets to combine, got {list(datasets)}")
    if modalities is not None and len(modalities) != len(datasets):
        raise ValueError(f"{len(modalities)} modalities for {len(datasets)} datasets; give one tag per dataset")
    folder_name = dataset_folder_name(new_id, name)
    folders = [_find_dataset(d, root) for d in datasets]
    if len({f.resolve() for f in folders}) != len(folders):
        raise ValueError(f"a dataset is given twice: {[f.name for f in folders]}")
    if (root / folder_name).resolve() in {f.resolve() for f in folders}:
        raise ValueError(f"{folder_name} is one of the datasets to combine; write the combination to another id")
    sources = [_load_source(f, None if modalities is None else modalities[i]) for i, f in enumerate(folders)]
    _check_tags(sources)
    _apply_renames(sources, datasets, parse_renames(renames))
    labels = _combined_labels(sources)
    endings = {s.dataset_json["file_ending"] for s in sources}
    file_ending = endings.pop() if len(endings) == 1 else ".nii.gz"
    _check_free(root, int(new_id), folder_name, overwrite)

    tmp = root / f".{folder_name}.partial-{uuid.uuid4().hex[:8]}"    # hidden from nnU-Net until complete
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        case_modality, described = {}, {}
        for s in sources:
            case_modality.update(_write_source(s, tmp, labels, file_ending, progress))
            described[s.tag] = {"dataset": s.name, "channel_name": s.channel_name, "labels": s.labels,
                                "num_cases": len(s.cases), "normalisation": "per-case z-score (nnU-Net zscore)",
                                **{k: s.dataset_json[k] for k in ("reference", "licence", "license")
                                   if k in s.dataset_json}}
        tags = {"modalities": [s.tag for s in sources], "case_modality": case_modality, "sources": described}
        if any(set(s.labels) != set(labels) - {"background"} for s in sources):  # partial labels
            tags["annotated_labels"] = {s.tag: sorted(s.labels, key=labels.get) for s in sources}
        dataset_json = {
            "name": name,
            "description": "Combined from " + ", ".join(f"{s.name} ({s.tag})" for s in sources) +
                           " by moe_nnunet combine; original intensities, z-scored per case by nnU-Net",
            "channel_names": {"0": NORMALISATION},
            "labels": labels,
            "numTraining": len(case_modality),
            "file_ending": file_ending,
            MODALITY_KEY: tags,
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
        (tmp / TAG_FILE).write_text(json.dumps(tags, indent=2), encoding="utf-8")
        replaced = root / f".{folder_name}.replaced-{uuid.uuid4().hex[:8]}"
        if (root / folder_name).exists():  # overwrite: the old dataset stays until the new one is complete
            (root / folder_name).rename(replaced)
        try:
            tmp.rename(root / folder_name)
        except BaseException:
            if replaced.exists():
                replaced.rename(root / folder_name)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(replaced, ignore_errors=True)
    return root / folder_name


# ----------------------------------------------------------------------------------------------------- reading tags


def read_modality_tags(dataset_json: dict) -> dict | None:
    """The ``"moe_nnunet"`` object of a combined dataset's dataset.json, or None for any other dataset."""
    tags = dataset_json.get(MODALITY_KEY)
    if tags is None:
        return None
    if not isinstance(tags, dict) or not tags.get("modalities"):
        raise ValueError(f"dataset.json key {MODALITY_KEY!r} must hold {{'modalities': [...], ...}} as written by "
                         f"moe_nnunet combine, got {tags!r}")
    return tags


def experts_from_dataset_json(dataset_json: dict) -> tuple[list[list[int]], list[str]]:
    """Experts of the M4oE network for a dataset: ``(expert_channels, expert_names)``.

    A combined dataset (``"moe_nnunet"`` key) gets one expert per modality tag, all reading channel 0; any other
    dataset one expert per entry of ``channel_names``, named after it.
    """
    tags = read_modality_tags(dataset_json)
    if tags is not None:
        return [[0] for _ in tags["modalities"]], [str(t) for t in tags["modalities"]]
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    keys = sorted(channels, key=int)
    return [[int(k)] for k in keys], [str(channels[k]) for k in keys]
