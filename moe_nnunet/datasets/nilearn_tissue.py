"""REAL-derived brain tissue dataset from the ICBM 2009a (MNI152 nonlinear symmetric) template shipped with nilearn.

Source: ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (real imaging: an
average of 152 subjects' T1 MRI, with grey- and white-matter probability maps; Fonov et al. 2009/2011, McConnell
Brain Imaging Centre, McGill University; bundled with nilearn, whose description lists the licence as unknown, so
cite it and check the terms before redistributing anything built from it). There is a single real volume; the cases
of this dataset are DERIVED from it:

1. tissue label = argmax(background, GM, WM) of the probability maps, with background probability
   ``1 - p_GM - p_WM`` (clipped at 0). So a voxel is tissue when its tissue class is the most probable one;
   CSF and everything outside the brain are background.
2. T1 and probability maps are resampled to ``spacing_mm`` isotropic (anti-aliased linear interpolation); the
   label is the argmax of the *resampled* probabilities, which is the partial-volume-correct way to downsample a
   label (it equals nearest-neighbour labelling on a finer grid but without its aliasing).
3. ``num_cases`` random sub-boxes (70-85 % of each axis, sizes varying per case) are cropped; each crop keeps
   spacing and direction and gets the origin of its first voxel, so geometry stays exact.
4. Optionally (default on) a mild per-case intensity change: a gamma in [0.8, 1.25] on the [0, 1]-scaled T1 and
   a global scale in [0.75, 1.33]. This is augmentation, not new anatomy.

Because every case comes from the same brain, this dataset checks pipelines (I/O, geometry, training runs),
not generalisation.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from moe_nnunet.datasets.common import copy_geometry_from_array, crop, resample_to_spacing, write_nnunet_dataset

ICBM_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
TISSUE_LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
CROP_FRACTION = (0.70, 0.85)
GAMMA_RANGE = (0.8, 1.25)
SCALE_RANGE = (0.75, 1.33)


def nilearn_data_dir() -> Path:
    """nilearn's bundled data folder; ImportError with install advice if nilearn is missing."""
    try:
        import nilearn
    except ImportError as e:
        raise ImportError("the ICBM152 tissue dataset needs nilearn, an optional dependency: "
                          "pip install nilearn") from e
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [f for f in ICBM_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn at {folder} lacks {missing}; reinstall nilearn (pip install -U nilearn)")
    return folder


def icbm_maps(spacing_mm: float = 3.0, data_dir: str | os.PathLike | None = None
              ) -> tuple[sitk.Image, tuple[np.ndarray, np.ndarray]]:
    """The ICBM 2009a T1 (float32) and its grey- and white-matter probabilities in [0, 1] (z, y, x arrays on the T1's
    grid), all resampled to ``spacing_mm`` isotropic (anti-aliased linear)."""
    folder = Path(data_dir) if data_dir is not None else nilearn_data_dir()
    read = {k: sitk.ReadImage(str(folder / f)) for k, f in ICBM_FILES.items()}
    spacing = (float(spacing_mm),) * 3
    t1 = resample_to_spacing(read["t1"], spacing)
    gm, wm = (sitk.GetArrayFromImage(resample_to_spacing(read[k], spacing)) / 255.0 for k in ("gm", "wm"))
    return t1, (gm, wm)


def icbm_tissue_volume(spacing_mm: float = 3.0, data_dir: str | os.PathLike | None = None
                       ) -> tuple[sitk.Image, sitk.Image]:
    """The ICBM 2009a T1 (float32) and its 3-class tissue label (uint8), both resampled to ``spacing_mm``."""
    t1, probs = icbm_maps(spacing_mm, data_dir)
    background = np.clip(1.0 - probs[0] - probs[1], 0.0, None)
    label = np.argmax(np.stack([background, *probs]), axis=0).astype(np.uint8)
    return t1, copy_geometry_from_array(label, t1)


def _random_box(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    size = [int(round(n * rng.uniform(*CROP_FRACTION))) for n in shape]
    start = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
    return start, size


def _augment_intensity(image: sitk.Image, rng: np.random.Generator, vmax: float) -> sitk.Image:
    a = np.clip(sitk.GetArrayFromImage(image), 0.0, None) / vmax
    a = (a ** rng.uniform(*GAMMA_RANGE)) * vmax * np.exp(rng.uniform(*np.log(SCALE_RANGE)))
    return copy_geometry_from_array(a.astype(np.float32), image)


def template_crops(t1: sitk.Image, label: sitk.Image, name: str, num_cases: int, seed: int, augment: bool = True
                   ) -> tuple[list, dict]:
    """`num_cases` random crops (70-85 % of each axis) of one template volume and its label, each with a mild
    gamma and scale if `augment`: (cases for `write_nnunet_dataset`, {case_id: crop box})."""
    shape = sitk.GetArrayViewFromImage(label).shape
    vmax = float(np.max(sitk.GetArrayViewFromImage(t1)))
    rng = np.random.default_rng(seed)
    cases, boxes = [], {}
    for i in range(num_cases):
        start, size = _random_box(shape, rng)
        img = crop(t1, start, size)
        if augment:
            img = _augment_intensity(img, rng, vmax)
        case_id = f"{name}_{i:03d}"
        cases.append((case_id, [img], crop(label, start, size)))
        boxes[case_id] = {"start_zyx": start, "size_zyx": size}
    return cases, boxes


def build_icbm_tissue(raw_root: str | os.PathLike, dataset_id: int, name: str = "ICBM152Tissue",
                      spacing_mm: float = 3.0, num_cases: int = 10, seed: int = 0, augment: bool = True,
                      data_dir: str | os.PathLike | None = None) -> Path:
    """Write the REAL-derived ICBM152 grey/white-matter dataset (single channel "T1"); return its folder.

    Labels: background 0, grey_matter 1, white_matter 2. ``data_dir`` overrides nilearn's data folder (it must hold
    the three ICBM 2009a files). See the module docstring for what is real and what is derived.
    """
    if num_cases < 1:
        raise ValueError("num_cases must be >= 1")
    t1, label = icbm_tissue_volume(spacing_mm, data_dir)
    cases, boxes = template_crops(t1, label, name, num_cases, seed, augment)
    return write_nnunet_dataset(
        raw_root, dataset_id, name, cases, ["T1"], TISSUE_LABELS,
        extra={"description": "REAL-derived: crops of the ICBM 2009a nonlinear symmetric T1 template (one average "
                              "brain) with argmax(bg, GM, WM) tissue labels; "
                              + ("mild gamma/scale intensity augmentation per case" if augment
                                 else "no intensity augmentation"),
               "reference": "Fonov et al., NeuroImage 2011 / 2009 (ICBM 2009a), as bundled with nilearn",
               "licence": "ICBM 2009a template, (c) McConnell Brain Imaging Centre, MNI, McGill University; nilearn "
                          "lists its licence as unknown: cite it and check the terms before redistributing",
               "spacing_mm": float(spacing_mm), "seed": seed, "case_crops": boxes})
