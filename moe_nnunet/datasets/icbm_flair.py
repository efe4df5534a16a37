"""Two-channel brain dataset: the REAL ICBM 2009a T1 template, a SIMULATED FLAIR and SYNTHETIC white-matter lesions.

There is no real multi-sequence MRI with labels in any installable package, so this is the most realistic
multi-channel data that can be built from them; what is real and what is not:

* REAL: the T1 channel (the ICBM 2009a nonlinear symmetric T1 template bundled with nilearn, an average of 152
  subjects' scans; Fonov et al. 2009/2011) and the anatomy (its grey- and white-matter probability maps).
* SIMULATED: the FLAIR channel, computed from the same probability maps with a FLAIR-like contrast (grey matter
  brighter than white matter, CSF dark, the rest of the head dim): ``1.0 p_GM + 0.75 p_WM + 0.2 p_other`` inside
  the head, 0 outside.
* SYNTHETIC: the lesions, 3 to 6 per case, random rotated ellipsoids of 5-9 mm semi-axes inside the white matter
  (clipped to it), bright in FLAIR (1.6) and left unchanged in the T1, so a lesion is found from FLAIR only, as
  white-matter hyperintensities are in practice.

Labels: background 0, grey_matter 1, white_matter 2 (argmax(background, GM, WM) of the resampled maps, visible in
both channels), lesion 3 (FLAIR only). Each case is a random crop (70-85 % of each axis; spacing and direction
kept, origin of its first voxel) with its own lesions; the FLAIR gets a slight blur, a smooth bias field, noise and
a per-case gain (log-uniform in [0.5, 2]); the T1 a mild gamma and scale per case. All cases come from one brain:
the dataset measures how models use the two channels and cope with one missing, not generalisation.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, gaussian_filter

from moe_nnunet.datasets.common import copy_geometry_from_array, crop, write_nnunet_dataset
from moe_nnunet.datasets.nilearn_tissue import _augment_intensity, _random_box, icbm_maps
from moe_nnunet.datasets.phantom import _bias_field, _ellipsoid, _random_rotation

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2, "lesion": 3}
FLAIR_LEVELS = {"grey_matter": 1.0, "white_matter": 0.75, "other_head": 0.2, "lesion": 1.6}
LESION_RADIUS_MM = (5.0, 9.0)
LESIONS_PER_CASE = (3, 6)
FLAIR_NOISE = 0.05
FLAIR_GAIN = (0.5, 2.0)


def _lesions(label: np.ndarray, spacing_zyx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of 3-6 random ellipsoids centred in (eroded) white matter and clipped to it."""
    wm = label == LABELS["white_matter"]
    core = binary_erosion(wm, iterations=1)
    centres = np.argwhere(core if core.any() else wm)
    coords = np.indices(label.shape, dtype=np.float64) * spacing_zyx[:, None, None, None]
    mask = np.zeros(label.shape, dtype=bool)
    for _ in range(int(rng.integers(LESIONS_PER_CASE[0], LESIONS_PER_CASE[1] + 1))):
        centre = centres[rng.integers(len(centres))] * spacing_zyx
        mask |= _ellipsoid(coords, centre, rng.uniform(*LESION_RADIUS_MM, size=3), _random_rotation(rng))
    return mask & wm


def _flair(p_gm: np.ndarray, p_wm: np.ndarray, head: np.ndarray, lesion: np.ndarray, spacing_zyx: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    other = np.clip(1.0 - p_gm - p_wm, 0.0, None)
    clean = (FLAIR_LEVELS["grey_matter"] * p_gm + FLAIR_LEVELS["white_matter"] * p_wm
             + FLAIR_LEVELS["other_head"] * other) * head
    clean[lesion] = FLAIR_LEVELS["lesion"]
    clean = gaussian_filter(clean, sigma=0.5 * spacing_zyx.min() / spacing_zyx)
    unit = np.indices(clean.shape, dtype=np.float64) / (np.asarray(clean.shape)[:, None, None, None] - 1) * 2 - 1
    noisy = clean * _bias_field(unit, rng) + rng.normal(0.0, FLAIR_NOISE, size=clean.shape)
    gain = float(np.exp(rng.uniform(*np.log(FLAIR_GAIN))))
    return (noisy * gain).astype(np.float32)


def build_icbm_flair_lesions(raw_root: str | os.PathLike, dataset_id: int, name: str = "ICBM152T1FlairLesions",
                             spacing_mm: float = 4.0, num_cases: int = 20, seed: int = 0,
                             data_dir: str | os.PathLike | None = None) -> Path:
    """Write the two-channel (T1 real, FLAIR simulated) dataset with synthetic lesions; return its folder.

    Channels "T1" and "FLAIR" (both z-scored per case by nnU-Net); labels grey_matter, white_matter, lesion. See the
    module docstring for what is real, simulated and synthetic.
    """
    if num_cases < 1:
        raise ValueError("num_cases must be >= 1")
    t1, maps = icbm_maps(spacing_mm, data_dir)
    p_gm, p_wm = maps
    label = np.argmax(np.stack([np.clip(1.0 - p_gm - p_wm, 0.0, None), p_gm, p_wm]), axis=0).astype(np.uint8)
    t1_array = sitk.GetArrayViewFromImage(t1)
    vmax = float(t1_array.max())
    head = t1_array > 0.05 * vmax
    spacing_zyx = np.asarray(t1.GetSpacing()[::-1], dtype=np.float64)
    rng = np.random.default_rng(seed)
    cases, crops = [], {}
    for i in range(num_cases):
        start, size = _random_box(label.shape, rng)
        box = tuple(slice(s, s + n) for s, n in zip(start, size))
        t1_crop = crop(t1, start, size)
        case_label = label[box].copy()
        lesion = _lesions(case_label, spacing_zyx, rng)
        case_label[lesion] = LABELS["lesion"]
        flair = _flair(p_gm[box], p_wm[box], head[box], lesion, spacing_zyx, rng)
        case_id = f"{name}_{i:03d}"
        cases.append((case_id, [_augment_intensity(t1_crop, rng, vmax), copy_geometry_from_array(flair, t1_crop)],
                      copy_geometry_from_array(case_label, t1_crop)))
        crops[case_id] = {"start_zyx": start, "size_zyx": size, "lesion_voxels": int(lesion.sum())}
    return write_nnunet_dataset(
        raw_root, dataset_id, name, cases, ["T1", "FLAIR"], LABELS,
        extra={"description": "T1 REAL (crops of the ICBM 2009a T1 template), FLAIR SIMULATED from the template's "
                              "tissue maps, lesions SYNTHETIC (white matter, visible in FLAIR only); see "
                              "moe_nnunet.datasets.icbm_flair",
               "reference": "Fonov et al., NeuroImage 2011 / 2009 (ICBM 2009a), as bundled with nilearn",
               "licence": "ICBM 2009a template, (c) McConnell Brain Imaging Centre, MNI, McGill University; nilearn "
                          "lists its licence as unknown: cite it and check the terms before redistributing",
               "label_channels": {"grey_matter": ["T1", "FLAIR"], "white_matter": ["T1", "FLAIR"],
                                  "lesion": ["FLAIR"]},
               "spacing_mm": float(spacing_mm), "seed": seed, "case_crops": crops})
