"""Shared helpers for the dataset builders: writing nnU-Net v2 raw datasets, resampling and geometry-keeping crops.

Array shapes, crop boxes and spacings in this package's public API are given in numpy order (z, y, x), the order
nnU-Net uses in its plans. SimpleITK's own getters and setters use (x, y, z); the helpers below do the conversion.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

FILE_ENDING = ".nii.gz"
NNUNET_RAW_ENV = "nnUNet_raw"

Case = tuple[str, Sequence[sitk.Image], sitk.Image]


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset: ``Dataset{id:03d}_{name}``."""
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '_' or '-' (no spaces, no slashes)")
    return f"Dataset{int(dataset_id):03d}_{name}"


def resolve_raw_root(raw_root: str | os.PathLike | None) -> Path:
    """``raw_root`` if given, else the ``nnUNet_raw`` environment variable; ValueError if neither is set."""
    if raw_root is None:
        raw_root = os.environ.get(NNUNET_RAW_ENV)
        if not raw_root:
            raise ValueError(f"no output folder: pass raw_root (CLI: --raw DIR) or set the {NNUNET_RAW_ENV} "
                             f"environment variable")
    return Path(raw_root)


def default_cache_dir() -> Path:
    """Download cache: ``$MOE_NNUNET_CACHE``, else ``$XDG_CACHE_HOME/moe_nnunet``, else ``~/.cache/moe_nnunet``."""
    if os.environ.get("MOE_NNUNET_CACHE"):
        return Path(os.environ["MOE_NNUNET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe_nnunet"


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True if both images have the same size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def _prepare_folder(raw_root: Path, dataset_id: int, name: str, overwrite: bool) -> Path:
    folder = raw_root / dataset_folder_name(dataset_id, name)
    clashes = [p.name for p in raw_root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != folder.name]
    if clashes:
        raise FileExistsError(f"dataset id {dataset_id} is already used in {raw_root} by {clashes}; nnU-Net needs "
                              f"unique ids, pick another id")
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists (pass overwrite=True to replace it)")
        if not (folder / "dataset.json").is_file():
            raise FileExistsError(f"{folder} exists but has no dataset.json; refusing to delete it")
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    return folder


def write_nnunet_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str, cases: Sequence[Case],
                         channel_names: Sequence[str] | Mapping[str, str], labels: Mapping[str, int],
                         extra: Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write a raw nnU-Net v2 dataset ``raw_root/Dataset{id:03d}_{name}`` and return its folder.

    ``cases`` holds ``(case_id, [one image per channel], label)``; case ids must be unique. Every channel image and the
    label must share one geometry (size, spacing, origin, direction): the label is checked against the first channel.
    Images keep their pixel type; labels are written as uint8 and may only hold the values in ``labels`` (a mapping
    name -> value that must start with ``background: 0`` and be consecutive). ``extra`` is merged into dataset.json
    (nnU-Net ignores keys it does not know). An existing folder of the same name is replaced if ``overwrite``.
    """
    channel_map = ({str(k): str(v) for k, v in channel_names.items()} if isinstance(channel_names, Mapping)
                   else {str(i): str(c) for i, c in enumerate(channel_names)})
    if sorted(channel_map, key=int) != [str(i) for i in range(len(channel_map))] or not channel_map:
        raise ValueError(f"channel_names must be keyed 0..C-1, got {channel_map}")
    values = sorted(int(v) for v in labels.values())
    if labels.get("background") != 0 or values != list(range(len(values))):
        raise ValueError(f"labels must be {{'background': 0, ...}} with consecutive values, got {dict(labels)}")
    ids = [str(c[0]) for c in cases]
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError("cases need unique case ids (and there must be at least one case)")

    folder = _prepare_folder(Path(raw_root), dataset_id, name, overwrite)
    for case_id, images, label in cases:
        if len(images) != len(channel_map):
            raise ValueError(f"case {case_id}: {len(images)} images for {len(channel_map)} channels")
        for c, img in enumerate(images):
            if not same_geometry(img, images[0]) or not same_geometry(img, label):
                raise ValueError(f"case {case_id}: channel {c} and label do not share one geometry")
        lab = sitk.Cast(label, sitk.sitkUInt8) if label.GetPixelID() != sitk.sitkUInt8 else label
        present = np.unique(sitk.GetArrayViewFromImage(lab))
        if not set(present.tolist()) <= set(values):
            raise ValueError(f"case {case_id}: label values {present.tolist()} not within {values}")
        for c, img in enumerate(images):
            sitk.WriteImage(img, str(folder / "imagesTr" / f"{case_id}_{c:04d}{FILE_ENDING}"), useCompression=True)
        sitk.WriteImage(lab, str(folder / "labelsTr" / f"{case_id}{FILE_ENDING}"), useCompression=True)

    dataset_json: dict[str, Any] = {
        "name": name,
        "channel_names": channel_map,
        "labels": {k: int(v) for k, v in sorted(labels.items(), key=lambda kv: kv[1])},
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
    }
    dataset_json.update(extra or {})
    with open(folder / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


# --------------------------------------------------------------------------------------------------- geometry


def resample_to_spacing(image: sitk.Image, spacing_zyx: Sequence[float], interpolator: int = sitk.sitkLinear,
                        default_value: float = 0.0, antialias: bool = True) -> sitk.Image:
    """Resample onto a grid with spacing ``spacing_zyx`` covering the same physical extent.

    Origin (the first voxel's centre) and direction are kept; the size is ``round(old_extent / new_spacing)``. With
    ``antialias`` and an interpolator other than nearest neighbour, axes that get coarser are first smoothed with a
    Gaussian of sigma ``(new - old) / 2`` mm. The output has the input's pixel type only for nearest neighbour;
    otherwise it is float32.
    """
    new_spacing = [float(s) for s in spacing_zyx[::-1]]
    old_spacing = image.GetSpacing()
    size = [max(1, int(round(n * o / s))) for n, o, s in zip(image.GetSize(), old_spacing, new_spacing)]
    src = image
    if interpolator != sitk.sitkNearestNeighbor:
        src = sitk.Cast(image, sitk.sitkFloat32)
        sigmas = [max(0.0, (s - o) / 2) for s, o in zip(new_spacing, old_spacing)]
        if antialias and any(sg > 0 for sg in sigmas):
            src = sitk.DiscreteGaussian(src, variance=[sg ** 2 for sg in sigmas], maximumKernelWidth=64,
                                        useImageSpacing=True)
    return sitk.Resample(src, size, sitk.Transform(), interpolator, image.GetOrigin(), new_spacing,
                         image.GetDirection(), default_value, src.GetPixelID())


def crop(image: sitk.Image, start_zyx: Sequence[int], size_zyx: Sequence[int]) -> sitk.Image:
    """Sub-box of ``image`` starting at voxel ``start_zyx`` with ``size_zyx`` voxels.

    Spacing and direction are unchanged and the origin becomes the physical position of voxel ``start_zyx``, so each
    cropped voxel keeps its physical location: ``crop[i]`` is ``image[start + i]``.
    """
    start = [int(s) for s in start_zyx[::-1]]
    size = [int(s) for s in size_zyx[::-1]]
    if any(s < 0 or n < 1 or s + n > full for s, n, full in zip(start, size, image.GetSize())):
        raise ValueError(f"crop start {tuple(start_zyx)} size {tuple(size_zyx)} outside image of shape "
                         f"{image.GetSize()[::-1]} (z, y, x)")
    return sitk.RegionOfInterest(image, size, start)


def random_crop_start(shape_zyx: Sequence[int], size_zyx: Sequence[int], rng: np.random.Generator,
                      contain_lo: Sequence[int] | None = None, contain_hi: Sequence[int] | None = None,
                      margin: int = 2) -> tuple[int, ...]:
    """A random crop start so that a box of ``size_zyx`` fits in ``shape_zyx``.

    If ``contain_lo``/``contain_hi`` (inclusive voxel bounds of a region, e.g. a lesion's bounding box) are given, the
    crop contains that region plus ``margin`` voxels wherever it fits along an axis; where the region is larger than
    the crop the crop is placed so it at least contains the region's centre.
    """
    start = []
    for ax, (full, size) in enumerate(zip(shape_zyx, size_zyx)):
        if size > full:
            raise ValueError(f"crop size {tuple(size_zyx)} larger than image {tuple(shape_zyx)}")
        lo_s, hi_s = 0, full - size
        if contain_lo is not None and contain_hi is not None:
            lo, hi = int(contain_lo[ax]), int(contain_hi[ax])
            if hi - lo + 1 + 2 * margin <= size:
                lo_s, hi_s = max(lo_s, hi + margin - size + 1), min(hi_s, lo - margin)
            elif hi - lo + 1 <= size:
                lo_s, hi_s = max(lo_s, hi - size + 1), min(hi_s, lo)
            else:
                c = (lo + hi) // 2
                lo_s, hi_s = max(lo_s, c - size + 1), min(hi_s, c)
            if lo_s > hi_s:  # region touches the border: clamp
                lo_s = hi_s = int(np.clip(lo - margin, 0, full - size))
        start.append(int(rng.integers(lo_s, hi_s + 1)))
    return tuple(start)


def copy_geometry_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array with ``reference``'s spacing, origin and direction."""
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    return img
