"""REAL lesion datasets from the test data inside the pyradiomics 3.0.1 source distribution (PyPI).

The sdist ``pyradiomics-3.0.1.tar.gz`` ships ``data/`` with real, anonymised scans and manual lesion masks
(BSD-3-Clause licence of pyradiomics, (c) Harvard Medical School; the images come from public collections, see the
pyradiomics documentation): ``lung1``/``lung2`` CT (HU, 512 x 512 x 48/61, ~0.6 x 0.6 x 5 mm) with a lung tumour
mask, and ``brain1``/``brain2`` MRI (256 x 256 x 25/23, 0.78 x 0.78 x 6.5 mm) with a lesion mask. Masks are on the
image grid and hold {0, 1}.

Two subjects are too few for a 5-fold split, so each dataset is DERIVED: the scan is resampled to a coarser grid
(anti-aliased linear for the image; the mask linearly interpolated and thresholded at 0.5; only the region that
lesion-containing crops can reach is resampled, see ``context_mm`` in dataset.json) and ``num_cases`` crops
at random offsets are cut, each containing the whole lesion (plus a margin), alternating between the two subjects.
Crops keep spacing and direction and get the origin of their first voxel. Crops of one subject overlap heavily, so
cross-validation on these datasets measures fitting, not generalisation.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from moe_nnunet.datasets.common import (crop, default_cache_dir, random_crop_start, resample_to_spacing,
                                        write_nnunet_dataset)

PYRADIOMICS_VERSION = "3.0.1"
_SDIST = f"pyradiomics-{PYRADIOMICS_VERSION}"
DATA_FILES = [f"{c}_{k}.nrrd" for c in ("lung1", "lung2", "brain1", "brain2", "breast1") for k in ("image", "label")]
LESION_LABELS = {"background": 0, "lesion": 1}
_INTEGER_TYPES = {sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32}


def _pip(*args: str) -> subprocess.CompletedProcess:
    """Run pip of this interpreter; few retries, so that a machine without PyPI access fails quickly."""
    return subprocess.run([sys.executable, "-m", "pip", *args, "--retries", "2", "--timeout", "30"],
                          capture_output=True, text=True)


def fetch_pyradiomics_data(cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the pyradiomics 3.0.1 sdist from PyPI (once) and return its extracted ``data/`` folder.

    Runs ``python -m pip download --no-deps --no-build-isolation --no-binary :all: pyradiomics==3.0.1`` into
    ``cache_dir`` (default: :func:`default_cache_dir` / "pyradiomics"). pip prepares the sdist's metadata, which
    imports numpy, setuptools and versioneer, so missing setuptools/versioneer are pip-installed first. Only
    ``pyradiomics-3.0.1/data/`` is extracted. A second call finds the files and does nothing. RuntimeError if pip
    fails (e.g. no access to PyPI).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "pyradiomics"
    data_dir = cache / _SDIST / "data"
    if all((data_dir / f).is_file() for f in DATA_FILES):
        return data_dir
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{_SDIST}.tar.gz"
    if not tarball.is_file():
        missing = [m for m in ("setuptools", "versioneer") if importlib.util.find_spec(m) is None]
        if missing:
            res = _pip("install", *missing)
            if res.returncode:
                raise RuntimeError(f"pip install {' '.join(missing)} failed:\n{res.stderr[-2000:]}")
        res = _pip("download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
                   f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", str(cache))
        if res.returncode or not tarball.is_file():
            raise RuntimeError(f"could not download pyradiomics=={PYRADIOMICS_VERSION} from PyPI:\n"
                               f"{(res.stderr or res.stdout)[-2000:]}")
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{_SDIST}/data/") and (m.isfile() or m.isdir())]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache, members=members, filter="data")
        else:  # older Pythons: the member list above already excludes links and devices
            if any(Path(m.name).is_absolute() or ".." in Path(m.name).parts for m in members):
                raise RuntimeError(f"unsafe paths in {tarball}")
            tar.extractall(cache, members=members)
    if not all((data_dir / f).is_file() for f in DATA_FILES):
        raise RuntimeError(f"{tarball} lacks some of {DATA_FILES} under {_SDIST}/data/")
    return data_dir


def load_subject(data_dir: str | os.PathLike, subject: str, spacing_zyx: Sequence[float] | None = None,
                 context_mm: Sequence[float] | None = None) -> tuple[sitk.Image, sitk.Image]:
    """``(image, label)`` of one pyradiomics subject (e.g. "lung1"), optionally resampled to ``spacing_zyx``.

    With ``context_mm`` (z, y, x) the native scan is first cut to the lesion's bounding box plus that much on each
    side (plus two voxels), which is all a lesion-containing crop can reach, so resampling does less work. The image
    keeps its pixel type (rounded if resampled); the label is uint8 {0, 1}. Resampling never removes the lesion: if
    thresholding the interpolated mask at 0.5 leaves nothing, the threshold drops to half its maximum.
    """
    image = sitk.ReadImage(str(Path(data_dir) / f"{subject}_image.nrrd"))
    label = sitk.ReadImage(str(Path(data_dir) / f"{subject}_label.nrrd"))
    label.CopyInformation(image)              # same grid by construction; removes float round-off in the headers
    label = sitk.Cast(label > 0, sitk.sitkUInt8)
    if context_mm is not None:
        fg = np.argwhere(sitk.GetArrayViewFromImage(label) > 0)
        margin = np.ceil(np.asarray(context_mm, float) / np.asarray(image.GetSpacing()[::-1])).astype(int) + 2
        lo = np.maximum(fg.min(0) - margin, 0)
        hi = np.minimum(fg.max(0) + margin + 1, image.GetSize()[::-1])
        image, label = crop(image, lo, hi - lo), crop(label, lo, hi - lo)
    if spacing_zyx is None:
        return image, label
    low = float(np.min(sitk.GetArrayViewFromImage(image)))
    resampled = resample_to_spacing(image, spacing_zyx, default_value=low)
    if image.GetPixelID() in _INTEGER_TYPES:
        resampled = sitk.Cast(sitk.Round(resampled), image.GetPixelID())
    soft = sitk.GetArrayFromImage(resample_to_spacing(sitk.Cast(label, sitk.sitkFloat32), spacing_zyx,
                                                      antialias=False))
    threshold = 0.5 if soft.max() > 0.5 else soft.max() / 2
    mask = (soft >= threshold) & (soft > 0)
    new_label = sitk.GetImageFromArray(mask.astype(np.uint8))
    new_label.CopyInformation(resampled)
    return resampled, new_label


def build_lesion_crops(raw_root: str | os.PathLike, dataset_id: int, name: str, subjects: Sequence[str],
                       channel_name: str, spacing_zyx: Sequence[float] | None, crop_size_zyx: Sequence[int],
                       num_cases: int = 10, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                       description: str = "") -> Path:
    """Cut ``num_cases`` lesion-containing crops from ``subjects`` (round robin) and write them as a dataset."""
    if num_cases < 1:
        raise ValueError("num_cases must be >= 1")
    data_dir = fetch_pyradiomics_data(cache_dir)
    rng = np.random.default_rng(seed)
    native = sitk.ReadImage(str(data_dir / f"{subjects[0]}_image.nrrd")).GetSpacing()[::-1]
    context_mm = [c * s for c, s in zip(crop_size_zyx, spacing_zyx or native)]
    volumes = [load_subject(data_dir, s, spacing_zyx, context_mm) for s in subjects]
    cases, sources = [], {}
    for i in range(num_cases):
        k = i % len(subjects)
        image, label = volumes[k]
        lab = sitk.GetArrayViewFromImage(label)
        size = [min(int(c), n) for c, n in zip(crop_size_zyx, lab.shape)]
        fg = np.argwhere(lab > 0)
        start = random_crop_start(lab.shape, size, rng, fg.min(0), fg.max(0))
        case_id = f"{name}_{i:03d}"
        cases.append((case_id, [crop(image, start, size)], crop(label, start, size)))
        sources[case_id] = {"subject": subjects[k], "start_zyx": list(start), "size_zyx": size}
    return write_nnunet_dataset(
        raw_root, dataset_id, name, cases, [channel_name], LESION_LABELS,
        extra={"description": description,
               "reference": f"pyradiomics {PYRADIOMICS_VERSION} test data (sdist data/ folder), "
                            "https://github.com/AIM-Harvard/pyradiomics",
               "licence": "pyradiomics: BSD-3-Clause, (c) Harvard Medical School",
               "spacing_zyx": None if spacing_zyx is None else [float(s) for s in spacing_zyx],
               "context_mm": context_mm, "seed": seed, "case_sources": sources})


def build_lung_ct(raw_root: str | os.PathLike, dataset_id: int, name: str = "LungCTLesion", num_cases: int = 10,
                  seed: int = 0, spacing_zyx: Sequence[float] | None = (5.0, 1.2, 1.2),
                  crop_size_zyx: Sequence[int] = (32, 96, 96), cache_dir: str | os.PathLike | None = None) -> Path:
    """REAL lung CT tumour dataset from pyradiomics lung1/lung2 (channel "CT", label "lesion"); return its folder.

    The channel is named "CT" so nnU-Net uses its CT normalisation (global HU percentiles). Defaults: resample to
    5 x 1.2 x 1.2 mm (z, y, x), crops of 32 x 96 x 96 voxels.
    """
    return build_lesion_crops(raw_root, dataset_id, name, ("lung1", "lung2"), "CT", spacing_zyx, crop_size_zyx,
                              num_cases, seed, cache_dir,
                              "REAL-derived: crops around the lung tumour of 2 CT scans (pyradiomics lung1, lung2)")


def build_brain_mri(raw_root: str | os.PathLike, dataset_id: int, name: str = "BrainMRILesion", num_cases: int = 10,
                    seed: int = 0, spacing_zyx: Sequence[float] | None = (6.5, 1.2, 1.2),
                    crop_size_zyx: Sequence[int] = (16, 96, 96), cache_dir: str | os.PathLike | None = None) -> Path:
    """REAL brain MRI lesion dataset from pyradiomics brain1/brain2 (channel "MRI", label "lesion").

    "MRI" is not a special nnU-Net channel name, so the channel is z-scored per case. Defaults: resample to
    6.5 x 1.2 x 1.2 mm (z, y, x), crops of 16 x 96 x 96 voxels.
    """
    return build_lesion_crops(raw_root, dataset_id, name, ("brain1", "brain2"), "MRI", spacing_zyx, crop_size_zyx,
                              num_cases, seed, cache_dir,
                              "REAL-derived: crops around the lesion of 2 brain MRI scans (pyradiomics brain1, brain2)")
