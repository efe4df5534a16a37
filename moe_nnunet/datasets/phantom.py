"""SYNTHETIC multi-channel 3D phantom whose labels are each recoverable only from known channels.

Nothing here is real imaging data. The phantom exists to test multi-channel behaviour (a structure visible in only
one modality, a modality missing at inference, experts that specialise per channel) on data whose ground truth about
*which channel carries which label* is known by construction.

Each case is a grid (default 32 x 48 x 48 voxels, spacing 2 x 1 x 1 mm, z y x) holding

* a "tissue" body (an ellipsoid) at the same relative intensity in every channel;
* for every channel ``c`` one label ``{c}_blob`` that is bright in ``c`` and indistinguishable from tissue in all other
  channels, so it can only be segmented from channel ``c``;
* with three or more channels, one label ``{c1}_{c2}_combo`` (c1, c2 = second and third channel) that is moderately
  bright in ``c1`` and dark in ``c2``. Unlabelled decoy structures share each half of that appearance (decoys
  moderately bright in ``c1`` only, decoys dark in ``c2`` only), so neither channel alone identifies it; both
  together do. The ``{c1}_blob`` is brighter still than the combo in ``c1``, so it stays separable by a threshold.

Every structure is a randomly placed, sized and rotated ellipsoid (no overlaps). The clean image is blurred slightly
(partial volume), multiplied by a smooth random bias field per channel, given Gaussian noise, and scaled by a
per-case, per-channel gain drawn log-uniformly from [0.2, 5], so per-case intensity normalisation is required.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, gaussian_filter

from moe_nnunet.datasets.common import write_nnunet_dataset

# relative intensity levels (tissue = 1)
LEVELS = {"outside": 0.0, "tissue": 1.0, "dark": 0.35, "moderately_bright": 1.6, "bright": 2.0, "very_bright": 2.6}
NOISE_SIGMA = 0.08          # relative to tissue, before the per-case gain
BIAS_AMPLITUDE = 0.15       # max |log bias|
GAIN_RANGE = (0.2, 5.0)     # per-case, per-channel multiplicative scale (log-uniform)
RADIUS_MM = (4.0, 8.0)      # ellipsoid semi-axes of the structures
DECOYS_PER_KIND = 3
# channel names that nnU-Net maps to a non-z-score normalisation; the phantom's intensities are arbitrary
_RESERVED_CHANNEL_NAMES = {"ct", "nonorm", "zscore", "rescale_to_0_1", "rgb_to_0_1"}


def phantom_structures(channels: Sequence[str]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The label map and the list of structures drawn in every case.

    Returns ``(labels, structures)``; each structure is ``{"name", "label" (0 for decoys), "appearance":
    {channel: level name}, "visible_in": [channels], "count": per case}``. Channels not in ``appearance`` show tissue.
    """
    labels = {"background": 0}
    structures: list[dict[str, Any]] = []
    combo = len(channels) >= 3
    for i, ch in enumerate(channels):
        name = f"{ch.lower()}_blob"
        labels[name] = len(labels)
        level = "very_bright" if combo and i == 1 else "bright"
        structures.append({"name": name, "label": labels[name], "appearance": {ch: level}, "visible_in": [ch],
                           "count": 1})
    if combo:
        c1, c2 = channels[1], channels[2]
        name = f"{c1.lower()}_{c2.lower()}_combo"
        labels[name] = len(labels)
        structures.append({"name": name, "label": labels[name],
                           "appearance": {c1: "moderately_bright", c2: "dark"}, "visible_in": [c1, c2],
                           "count": 1})
        structures.append({"name": f"decoy_{c1.lower()}_moderately_bright", "label": 0,
                           "appearance": {c1: "moderately_bright"}, "visible_in": [c1], "count": DECOYS_PER_KIND})
        structures.append({"name": f"decoy_{c2.lower()}_dark", "label": 0,
                           "appearance": {c2: "dark"}, "visible_in": [c2], "count": DECOYS_PER_KIND})
    return labels, structures


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid (semi-axes ``radii`` along the columns of ``rot``); ``coords`` is
    (3, ...) in mm."""
    d = np.einsum("ji,j...->i...", rot, coords - centre.reshape((3,) + (1,) * (coords.ndim - 1)))
    return ((d / radii.reshape((3,) + (1,) * (coords.ndim - 1))) ** 2).sum(0) <= 1.0


def _box(centre: np.ndarray, reach: float, spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Voxel slices of the axis-aligned box within ``reach`` mm of ``centre`` (clipped to the grid)."""
    lo = np.maximum(np.floor((centre - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / spacing).astype(int) + 1, shape)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))


def _bias_field(unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field exp(p), p a random quadratic polynomial with max |p| = BIAS_AMPLITUDE."""
    z, y, x = unit
    terms = [z, y, x, z * y, z * x, y * x, z * z, y * y, x * x]
    p = sum(rng.normal() * t for t in terms)
    p = p / max(np.abs(p).max(), 1e-6) * BIAS_AMPLITUDE * rng.uniform(0.5, 1.0)
    return np.exp(p)


def make_phantom_case(shape: Sequence[int], spacing: Sequence[float], channels: Sequence[str],
                      rng: np.random.Generator, max_tries: int = 1000) -> tuple[list[np.ndarray], np.ndarray]:
    """One phantom case as numpy arrays: ``([float32 (z, y, x) image per channel], uint8 label)``."""
    labels, structures = phantom_structures(channels)
    shape = tuple(int(s) for s in shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    idx = np.indices(shape, dtype=np.float64)
    coords = idx * spacing_arr[:, None, None, None]                     # mm
    extent = (np.asarray(shape) - 1) * spacing_arr
    unit = idx / (np.asarray(shape, dtype=np.float64)[:, None, None, None] - 1) * 2 - 1

    body_radii = extent / 2 * rng.uniform(0.85, 0.95, size=3)
    body_centre = extent / 2 + rng.uniform(-0.04, 0.04, size=3) * extent
    body_rot = _random_rotation(rng)
    body = _ellipsoid(coords, body_centre, body_radii, body_rot)
    inner = _ellipsoid(coords, body_centre, np.maximum(body_radii - spacing_arr.max(), 1.0), body_rot)

    level = {ch: np.where(body, LEVELS["tissue"], LEVELS["outside"]) for ch in channels}
    label = np.zeros(shape, dtype=np.uint8)
    occupied = np.zeros(shape, dtype=bool)
    for s in structures:
        for _ in range(s["count"]):
            scale = 1.0
            for attempt in range(max_tries):
                if attempt and attempt % 100 == 0:
                    scale *= 0.9                                           # crowded: try smaller ellipsoids
                radii = rng.uniform(*RADIUS_MM, size=3) * scale
                centre = body_centre + rng.uniform(-1, 1, size=3) * np.maximum(body_radii - radii.max(), 0)
                box = _box(centre, radii.max(), spacing_arr, shape)
                local = _ellipsoid(coords[(slice(None),) + box], centre, radii, _random_rotation(rng))
                if local.sum() >= 20 and not (local & ~inner[box]).any() and not (local & occupied[box]).any():
                    break
            else:
                raise RuntimeError(f"could not place structure {s['name']} in a {shape} phantom; use a larger shape")
            mask = np.zeros(shape, dtype=bool)
            mask[box] = local
            occupied |= binary_dilation(mask, iterations=1)
            label[mask] = s["label"]
            for ch, lv in s["appearance"].items():
                level[ch][mask] = LEVELS[lv]

    sigma_vox = 0.6 / spacing_arr * spacing_arr.min()                  # ~0.6 voxel of the finest axis, in voxels
    images = []
    for ch in channels:
        clean = gaussian_filter(level[ch], sigma=sigma_vox)
        noisy = clean * _bias_field(unit, rng) + rng.normal(0.0, NOISE_SIGMA, size=shape)
        gain = float(np.exp(rng.uniform(np.log(GAIN_RANGE[0]), np.log(GAIN_RANGE[1]))))
        images.append((noisy * gain).astype(np.float32))
    return images, label


def build_phantom(raw_root: str | os.PathLike, dataset_id: int, name: str = "MultiModalPhantom",
                  num_cases: int = 10, shape: Sequence[int] = (32, 48, 48),
                  spacing: Sequence[float] = (2.0, 1.0, 1.0), seed: int = 0,
                  channels: Sequence[str] = ("T1", "T2", "FLAIR")) -> Path:
    """Write the SYNTHETIC phantom as raw nnU-Net dataset ``Dataset{dataset_id:03d}_{name}``; return its folder.

    ``shape`` and ``spacing`` are in (z, y, x) order. Channel names are what nnU-Net's normalisation sees; names that
    select a special scheme (CT, noNorm, ...) are refused because the phantom's intensities need z-scoring. Besides
    dataset.json, ``phantom_description.json`` records which label is visible in which channel(s).
    """
    channels = [str(c) for c in channels]
    if not channels or len(set(c.lower() for c in channels)) != len(channels):
        raise ValueError(f"need at least one channel with unique names, got {channels}")
    bad = [c for c in channels if c.casefold() in _RESERVED_CHANNEL_NAMES]
    if bad:
        raise ValueError(f"channel names {bad} select a non-z-score nnU-Net normalisation; use e.g. T1, T2, FLAIR")
    if num_cases < 1:
        raise ValueError("num_cases must be >= 1")
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
        raise ValueError(f"shape must be 3 sizes >= 8 and spacing 3 positive values, got {shape}, {spacing}")
    rng = np.random.default_rng(seed)
    spacing_xyz = [float(s) for s in spacing[::-1]]
    origin_xyz = [-(n - 1) * s / 2 for n, s in zip(shape[::-1], spacing_xyz)]   # centred on (0, 0, 0)
    cases = []
    for i in range(num_cases):
        arrays, label = make_phantom_case(shape, spacing, channels, rng)
        imgs = []
        for a in [*arrays, label]:
            img = sitk.GetImageFromArray(a)
            img.SetSpacing(spacing_xyz)
            img.SetOrigin(origin_xyz)
            imgs.append(img)
        cases.append((f"{name}_{i:03d}", imgs[:-1], imgs[-1]))

    labels, structures = phantom_structures(channels)
    folder = write_nnunet_dataset(
        raw_root, dataset_id, name, cases, channels, labels,
        extra={"description": "SYNTHETIC multi-channel phantom: each label is visible only in known channel(s), "
                              "see phantom_description.json",
               "reference": "synthetic, generated by moe_nnunet.datasets.phantom",
               "licence": "synthetic data, no licence restrictions"})
    description = {
        "synthetic": True,
        "channels": channels,
        "labels": {s["name"]: {"value": s["label"], "visible_in": s["visible_in"],
                               "needs_all_of_visible_in": len(s["visible_in"]) > 1,
                               "appearance": {ch: s["appearance"].get(ch, "tissue") for ch in channels}}
                   for s in structures if s["label"] > 0},
        "decoys": [{"name": s["name"], "label": "background", "count_per_case": s["count"],
                    "appearance": {ch: s["appearance"].get(ch, "tissue") for ch in channels}}
                   for s in structures if s["label"] == 0],
        "label_channels": {s["name"]: s["visible_in"] for s in structures if s["label"] > 0},
        "relative_levels": LEVELS,
        "noise_sigma": NOISE_SIGMA, "bias_amplitude_log": BIAS_AMPLITUDE, "gain_range": list(GAIN_RANGE),
        "shape_zyx": list(shape), "spacing_zyx": list(spacing), "seed": seed, "num_cases": num_cases,
    }
    with open(folder / "phantom_description.json", "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return folder


def plan_phantom(dataset_id: int, configuration: str = "3d_fullres", num_processes: int = 1) -> list[str]:
    """Fingerprint, nnU-Net's plans, M4oE plans (`moe_nnunet plan`) and nnU-Net's preprocessing of ``configuration``
    for a phantom written by `build_phantom`, in this process, in ``$nnUNet_raw`` / ``$nnUNet_preprocessed``.

    This is what `nnUNetv2_plan_and_preprocess -c C --no_pp`, `moe_nnunet plan --no_verify` and
    `nnUNetv2_preprocess -plans_name nnUNetM4oEPlans -c C` do, without their integrity checks (the builder checked
    geometry and labels as it wrote them) and with 1e5 foreground intensities sampled for the fingerprint instead of
    nnU-Net's 1e8 (tens of seconds on a CPU): the phantom's channels are z-scored per case, so no plan reads them.
    Both plans name the same preprocessed data (``nnUNetPlans_{configuration}``), so one preprocessing serves both.
    Returns the plans names written.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from moe_nnunet.planners import M4oEPlanner

    class _FewSamples(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    extract_fingerprint_dataset(dataset_id, _FewSamples, num_processes=num_processes, check_dataset_integrity=False,
                                clean=True, verbose=False, show_progress_bar=False)
    names = [plan_experiment_dataset(dataset_id, planner)[1] for planner in (ExperimentPlanner, M4oEPlanner)]
    preprocess_dataset(dataset_id, names[-1], (configuration,), (num_processes,), show_progress_bar=False)
    return names
