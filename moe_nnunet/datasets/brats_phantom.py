"""SYNTHETIC BraTS-like 4-channel phantom (T1, T1c, T2, FLAIR) whose labels need several channels together.

Nothing here is real imaging data. It imitates the logic of the BraTS labels, not their appearance: each case is a
thin slab of a brain (default 8 slices of 80 x 80 voxels, 4 x 1.5 x 1.5 mm, z y x) holding one tumour and
unlabelled look-alikes, so that a model that loses a channel loses something, and we know what.

Relative intensities (healthy tissue = 1, with a smooth grey/white-matter texture of about +-0.08 that is brighter
in T1/T1c where it is darker in T2/FLAIR):

================================  =====  =====  =====  =====  ======================
structure                          T1     T1c    T2     FLAIR  label
================================  =====  =====  =====  =====  ======================
non-enhancing core (necrosis)      0.55   0.55   1.7    1.0    1 non_enhancing_core
edema                              0.85   0.85   1.7    1.7    2 edema
enhancing rim (shell of the core)  0.85   2.3    1.7    1.7    3 enhancing_tumour
ventricles (CSF)                   0.35   0.35   2.2    0.3    0
vessels: blobs, tubes, rings       0.9    2.3    0.45   0.9    0 (T1c-bright, T2 flow void)
fluid inside the vessel rings      0.55   0.55   2.2    0.3    0 (mimics the core in T1/T1c)
white-matter hyperintensities      0.85   0.85   1.15   1.7    0 (edema without T2)
fluid pockets                      0.85   0.85   1.7    0.6    0 (edema without FLAIR)
================================  =====  =====  =====  =====  ======================

Which label needs which channels (by construction; ``phantom_description.json`` records it too):

* **edema** needs **T2 and FLAIR** together: in T1, T1c and FLAIR it equals the white-matter hyperintensities, in
  T1, T1c and T2 it equals the fluid pockets; T2 alone does not separate it from the core and the rim.
* **enhancing_tumour** needs **T1c plus T2 or FLAIR**: only T1c tells the rim from edema, and the vessel decoys
  (some of them rings around core-like fluid) are as bright in T1c; they are dark in T2 and at tissue level in FLAIR.
  Without T1c the rim cannot be found (as in BraTS, where enhancing tumour collapses without T1c).
* **non_enhancing_core** needs **two channels**: T2 alone confuses it with edema (same T2), T1/T1c alone with the
  fluid inside the vessel rings; T2 with any of T1, T1c or FLAIR, or T1/T1c with FLAIR, separates it.

Every case is jittered so that no absolute level can be learnt: per case and channel a contrast factor in [0.6, 1.4]
scales every structure's difference from tissue, each structure's level gets N(0, 0.04), the clean image is blurred
slightly (partial volume), multiplied by a smooth bias field (|log| up to 0.3), given Gaussian noise (sigma 0.04 to
0.10 of tissue, per case and channel) and scaled by a per-case, per-channel gain drawn log-uniformly from [0.2, 5].
Shapes are ellipsoids with irregular, noise-perturbed borders; sizes are fractions of the brain, so any grid works.
The channel order is T1, T1c, T2, FLAIR (names nnU-Net z-scores per case).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, gaussian_filter

from moe_nnunet.datasets.common import write_nnunet_dataset
from moe_nnunet.datasets.phantom import _bias_field

CHANNELS = ("T1", "T1c", "T2", "FLAIR")
LABELS = {"background": 0, "non_enhancing_core": 1, "edema": 2, "enhancing_tumour": 3}
# structure -> (T1, T1c, T2, FLAIR) relative to tissue = 1
LEVELS = {
    "non_enhancing_core": (0.55, 0.55, 1.7, 1.0),
    "edema": (0.85, 0.85, 1.7, 1.7),
    "enhancing_tumour": (0.85, 2.3, 1.7, 1.7),
    "ventricle": (0.35, 0.35, 2.2, 0.3),
    "vessel": (0.9, 2.3, 0.45, 0.9),
    "ring_fluid": (0.55, 0.55, 2.2, 0.3),
    "white_matter_hyperintensity": (0.85, 0.85, 1.15, 1.7),
    "fluid_pocket": (0.85, 0.85, 1.7, 0.6),
}
NEEDS = {
    "edema": "T2 and FLAIR together (T1/T1c/FLAIR equal white-matter hyperintensities, T1/T1c/T2 equal fluid pockets)",
    "enhancing_tumour": "T1c plus T2 or FLAIR (only T1c separates it from edema; vessel decoys are as bright in T1c)",
    "non_enhancing_core": "two channels: T2 with any other, or T1/T1c with FLAIR (T2 alone: edema; T1/T1c alone: "
                          "the fluid inside vessel rings)",
}
TEXTURE = (0.08, 0.08, -0.08, -0.05)   # grey/white-matter contrast per channel (white matter brighter in T1)
CONTRAST_JITTER = (0.6, 1.4)
LEVEL_SIGMA = 0.04
NOISE_SIGMA = (0.04, 0.10)
BIAS_AMPLITUDE = 0.3
GAIN_RANGE = (0.2, 5.0)
DECOYS = {"vessel_blob": 2, "vessel_tube": 2, "vessel_ring": 1, "white_matter_hyperintensity": 3, "fluid_pocket": 3}


def _rotation_z(angle: float) -> np.ndarray:
    """Rotation in the (y, x) plane, as a (3, 3) matrix acting on (z, y, x) vectors."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _radius(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, angle: float,
            wobble: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the border) of every voxel; `wobble` (same shape, about +-1) makes the
    border irregular by up to 12 %."""
    d = np.einsum("ji,j...->i...", _rotation_z(angle), coords - centre[:, None, None, None])
    rho = np.sqrt(((d / radii[:, None, None, None]) ** 2).sum(0))
    return rho if wobble is None else rho * (1.0 + 0.12 * wobble)


def _smooth_field(shape: tuple[int, ...], sigma: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Smooth random field scaled to [-1, 1]."""
    f = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="wrap")
    return f / max(float(np.abs(f).max()), 1e-6)


class _Canvas:
    """One case being drawn: voxel coordinates in mm, the brain, what is occupied, the structure map."""

    def __init__(self, shape: tuple[int, ...], spacing: np.ndarray, rng: np.random.Generator) -> None:
        self.shape, self.spacing, self.rng = shape, spacing, rng
        self.coords = np.indices(shape, dtype=np.float64) * spacing[:, None, None, None]
        extent = (np.asarray(shape) - 1) * spacing
        self.centre = extent / 2
        self.brain_r = extent[1:].min() / 2 * rng.uniform(0.86, 0.94)        # in-plane semi-axis scale, mm
        radii = np.array([1e6, self.brain_r * rng.uniform(0.95, 1.05), self.brain_r * rng.uniform(0.85, 0.95)])
        self.brain = _radius(self.coords, self.centre, radii, rng.uniform(-0.2, 0.2)) <= 1.0
        self.inner = _radius(self.coords, self.centre, radii * np.array([1, 0.93, 0.93]), 0.0) <= 1.0
        self.slab = extent[0] + spacing[0]                                     # slab thickness, mm
        self.occupied = np.zeros(shape, dtype=bool)
        self.structure = np.full(shape, "", dtype=object)
        self.smooth_sigma = np.maximum(3.0 / spacing, 0.5)                    # ~3 mm, in voxels

    def random_centre(self, reach: float) -> np.ndarray:
        r = max(self.brain_r * 0.9 - reach, 0.0) * np.sqrt(self.rng.uniform())
        a = self.rng.uniform(0, 2 * np.pi)
        z = self.centre[0] + self.rng.uniform(-0.25, 0.25) * self.slab
        return np.array([z, self.centre[1] + r * np.sin(a), self.centre[2] + r * np.cos(a)])

    def radii(self, in_plane: tuple[float, float], z: tuple[float, float]) -> np.ndarray:
        return np.array([self.rng.uniform(*z) * self.slab, *(self.rng.uniform(*in_plane, size=2) * self.brain_r)])

    def fits(self, mask: np.ndarray) -> bool:
        return bool(mask.sum() >= 4 and not (mask & ~self.inner).any() and not (mask & self.occupied).any())

    def claim(self, mask: np.ndarray) -> None:
        self.occupied |= binary_dilation(mask, iterations=1)

    def paint(self, mask: np.ndarray, structure: str) -> None:
        self.structure[mask] = structure


def _place(canvas: _Canvas, draw, tries: int = 400) -> bool:
    """Call `draw(scale)` (returns {structure: mask} and the mask to claim) until it fits; shrink when crowded."""
    scale = 1.0
    for attempt in range(tries):
        if attempt and attempt % 50 == 0:
            scale *= 0.85
        parts, footprint = draw(scale)
        if canvas.fits(footprint):
            for name, mask in parts:
                canvas.paint(mask, name)
            canvas.claim(footprint)
            return True
    return False


def _tumour(canvas: _Canvas, scale: float):
    rng = canvas.rng
    radii = canvas.radii((0.32 * scale, 0.46 * scale), (0.4, 0.6))
    centre = canvas.random_centre(radii[1:].max())
    angle = rng.uniform(0, np.pi)
    wobble = _smooth_field(canvas.shape, canvas.smooth_sigma, rng)
    edema = _radius(canvas.coords, centre, radii, angle, wobble) <= 1.0
    core_radii = radii * rng.uniform(0.65, 0.8, size=3)
    core_centre = centre + rng.uniform(-0.15, 0.15, size=3) * (radii - core_radii)
    rho = _radius(canvas.coords, core_centre, core_radii, rng.uniform(0, np.pi), 0.5 * wobble)
    # 1.5-2.5 voxels, at most half the core's radius on coarse grids
    thickness = min(rng.uniform(1.5, 2.5) * canvas.spacing[1:].max() / core_radii[1:].mean(), 0.5)
    core = rho <= 1.0
    rim = core & (rho > 1.0 - thickness)
    return [("edema", edema & ~core), ("enhancing_tumour", rim), ("non_enhancing_core", core & ~rim)], edema | core


def _ventricles(canvas: _Canvas, scale: float):
    rng = canvas.rng
    masks = []
    for side in (-1, 1):
        radii = np.array([rng.uniform(0.3, 0.5) * canvas.slab, rng.uniform(0.2, 0.28) * canvas.brain_r * scale,
                          rng.uniform(0.06, 0.09) * canvas.brain_r * scale])
        centre = canvas.centre + np.array([0.0, rng.uniform(-0.08, 0.08) * canvas.brain_r,
                                           side * rng.uniform(0.1, 0.14) * canvas.brain_r])
        masks.append(_radius(canvas.coords, centre, radii, rng.uniform(-0.25, 0.25)) <= 1.0)
    both = masks[0] | masks[1]
    return [("ventricle", both)], both


def _decoy(kind: str):
    def draw(canvas: _Canvas, scale: float):
        rng = canvas.rng
        if kind == "vessel_tube":
            radii = np.array([rng.uniform(0.2, 0.5) * canvas.slab, rng.uniform(0.15, 0.3) * canvas.brain_r,
                              rng.uniform(0.045, 0.065) * canvas.brain_r]) * np.array([1, scale, 1])
        elif kind == "vessel_blob":
            radii = canvas.radii((0.05 * scale, 0.08 * scale), (0.2, 0.4))
        elif kind == "vessel_ring":
            radii = canvas.radii((0.1 * scale, 0.16 * scale), (0.3, 0.5))
        else:
            radii = canvas.radii((0.09 * scale, 0.2 * scale), (0.25, 0.5))
        centre = canvas.random_centre(radii[1:].max())
        rho = _radius(canvas.coords, centre, radii, rng.uniform(0, np.pi))
        mask = rho <= 1.0
        if kind == "vessel_ring":
            thickness = max(0.3, 1.6 * canvas.spacing[1:].max() / radii[1:].min())
            ring = mask & (rho > 1.0 - thickness)
            return [("vessel", ring), ("ring_fluid", mask & ~ring)], mask
        return [("vessel" if kind.startswith("vessel") else kind, mask)], mask
    return draw


def make_brats_phantom_case(shape: Sequence[int], spacing: Sequence[float],
                            rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """One case as numpy arrays: ``([float32 (z, y, x) image per channel of CHANNELS], uint8 label)``."""
    shape = tuple(int(s) for s in shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    canvas = _Canvas(shape, spacing_arr, rng)
    if not _place(canvas, lambda s: _ventricles(canvas, s)) or not _place(canvas, lambda s: _tumour(canvas, s)):
        raise RuntimeError(f"could not place the ventricles and tumour in a {shape} phantom; use a larger shape")
    for kind, count in DECOYS.items():
        for _ in range(count):
            _place(canvas, lambda s, d=_decoy(kind): d(canvas, s))   # a crowded case may lack a decoy

    label = np.zeros(shape, dtype=np.uint8)
    for name, value in LABELS.items():
        if value:
            label[canvas.structure == name] = value
    white_matter = _smooth_field(shape, canvas.smooth_sigma * 2, rng)
    unit = np.indices(shape, dtype=np.float64) / (np.asarray(shape, dtype=np.float64)[:, None, None, None] - 1).clip(1)
    unit = unit * 2 - 1
    blur = 0.6 * spacing_arr.min() / spacing_arr
    images = []
    for c in range(len(CHANNELS)):
        level = np.where(canvas.brain, 1.0 + TEXTURE[c] * white_matter, 0.0)
        contrast = rng.uniform(*CONTRAST_JITTER)
        for name, values in LEVELS.items():
            mask = canvas.structure == name
            if mask.any():
                level[mask] = 1.0 + contrast * (values[c] - 1.0) + rng.normal(0.0, LEVEL_SIGMA)
        clean = gaussian_filter(level, sigma=blur)
        bias = _bias_field(unit, rng) ** (BIAS_AMPLITUDE / 0.15)          # phantom's field has |log| <= 0.15
        noisy = clean * bias + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), size=shape)
        gain = float(np.exp(rng.uniform(np.log(GAIN_RANGE[0]), np.log(GAIN_RANGE[1]))))
        images.append((noisy * gain).astype(np.float32))
    return images, label


def build_brats_phantom(raw_root: str | os.PathLike, dataset_id: int, name: str = "BraTSPhantom",
                        num_cases: int = 40, shape: Sequence[int] = (8, 80, 80),
                        spacing: Sequence[float] = (4.0, 1.5, 1.5), seed: int = 0) -> Path:
    """Write the SYNTHETIC BraTS-like phantom as raw nnU-Net dataset ``Dataset{dataset_id:03d}_{name}``.

    ``shape`` and ``spacing`` are (z, y, x); the default thin slabs make nnU-Net's 2d configuration plan 80 x 80
    patches. Held-out cases are those of nnU-Net's own split (fold 0's validation cases), as for the other builders.
    Writes ``phantom_description.json`` beside dataset.json: levels, which label needs which channels, jitter.
    """
    if num_cases < 1:
        raise ValueError("num_cases must be >= 1")
    if len(shape) != 3 or len(spacing) != 3 or min(shape[1:]) < 24 or shape[0] < 1 or min(spacing) <= 0:
        raise ValueError(f"shape must be (z >= 1, y >= 24, x >= 24) and spacing 3 positive values, got {shape}, "
                         f"{spacing}")
    rng = np.random.default_rng(seed)
    spacing_xyz = [float(s) for s in spacing[::-1]]
    origin_xyz = [-(n - 1) * s / 2 for n, s in zip(shape[::-1], spacing_xyz)]
    cases = []
    for i in range(num_cases):
        arrays, label = make_brats_phantom_case(shape, spacing, rng)
        imgs = []
        for a in [*arrays, label]:
            img = sitk.GetImageFromArray(a)
            img.SetSpacing(spacing_xyz)
            img.SetOrigin(origin_xyz)
            imgs.append(img)
        cases.append((f"{name}_{i:03d}", imgs[:-1], imgs[-1]))
    folder = write_nnunet_dataset(
        raw_root, dataset_id, name, cases, CHANNELS, LABELS,
        extra={"description": "SYNTHETIC BraTS-like 4-channel phantom (T1, T1c, T2, FLAIR): edema, non-enhancing "
                              "core and enhancing rim, each needing several channels; see phantom_description.json",
               "reference": "synthetic, generated by moe_nnunet.datasets.brats_phantom",
               "licence": "synthetic data, no licence restrictions"})
    description = {
        "synthetic": True, "channels": list(CHANNELS), "labels": LABELS,
        "levels": {k: dict(zip(CHANNELS, v)) for k, v in LEVELS.items()},
        "label_needs": NEEDS, "decoys_per_case": DECOYS, "texture": dict(zip(CHANNELS, TEXTURE)),
        "contrast_jitter": list(CONTRAST_JITTER), "level_sigma": LEVEL_SIGMA, "noise_sigma": list(NOISE_SIGMA),
        "bias_amplitude_log": BIAS_AMPLITUDE, "gain_range": list(GAIN_RANGE),
        "shape_zyx": list(shape), "spacing_zyx": list(spacing), "seed": seed, "num_cases": num_cases,
    }
    (folder / "phantom_description.json").write_text(json.dumps(description, indent=2))
    return folder
