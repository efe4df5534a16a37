"""REAL-derived brain-region dataset from the Colin27 T1 and the AAL atlas of Debian's ``mricron-data`` package.

Source: ``/usr/share/mricron/templates/ch2.nii.gz`` (Colin27: one subject, the average of 27 T1 scans, 1 mm,
181 x 217 x 181, MNI space; Holmes et al. 1998) and ``aal.nii.gz`` on the same grid (AAL atlas, 116 regions,
Tzourio-Mazoyer et al. 2002), installed by ``apt-get install mricron-data`` (Debian/Ubuntu only). Where apt or the
package is not available the builder raises ``FileNotFoundError`` with that advice, and the tests skip.

The 116 AAL regions are grouped into three labels that a network can learn from a T1 at a few mm: cortex (the 82
cortical regions among AAL 1-90), deep_grey_matter (caudate, putamen, pallidum and thalamus, AAL 71-78) and
cerebellum (cerebellar hemispheres and vermis, AAL 91-116). No left/right split, since nnU-Net mirrors images
during training. Like ``icbm_tissue``, the T1 and each label's indicator are resampled to ``spacing_mm``
(anti-aliased linear) and the label is the argmax of the resampled indicators; cases are DERIVED random crops
(70-85 % of each axis, geometry kept) with a mild per-case gamma and scale. One subject: the dataset checks
pipelines, not generalisation.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from moe_nnunet.datasets.common import copy_geometry_from_array, resample_to_spacing, write_nnunet_dataset
from moe_nnunet.datasets.nilearn_tissue import template_crops

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
LABELS = {"background": 0, "cortex": 1, "deep_grey_matter": 2, "cerebellum": 3}
DEEP_GREY = range(71, 79)      # Caudate, Putamen, Pallidum, Thalamus (left and right)
CEREBRUM = range(1, 91)
CEREBELLUM = range(91, 117)


def mricron_templates(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding ch2.nii.gz and aal.nii.gz; FileNotFoundError with install advice if absent."""
    folder = Path(folder) if folder is not None else MRICRON_TEMPLATES
    missing = [f for f in ("ch2.nii.gz", "aal.nii.gz") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: the Colin27 dataset needs Debian's mricron-data "
                                f"package (sudo apt-get install mricron-data), available on Debian and Ubuntu only")
    return folder


def grouped_aal(aal: np.ndarray) -> np.ndarray:
    """AAL region numbers (z, y, x) -> this dataset's labels (uint8)."""
    lookup = np.zeros(max(int(aal.max()), 116) + 1, dtype=np.uint8)
    lookup[list(CEREBRUM)] = LABELS["cortex"]
    lookup[list(DEEP_GREY)] = LABELS["deep_grey_matter"]
    lookup[list(CEREBELLUM)] = LABELS["cerebellum"]
    return lookup[aal]


def colin27_volume(spacing_mm: float = 3.0, folder: str | os.PathLike | None = None
                   ) -> tuple[sitk.Image, sitk.Image]:
    """Colin27 T1 (float32) and the grouped AAL label (uint8), resampled to ``spacing_mm`` isotropic."""
    folder = mricron_templates(folder)
    t1 = sitk.Cast(sitk.ReadImage(str(folder / "ch2.nii.gz")), sitk.sitkFloat32)
    aal = sitk.ReadImage(str(folder / "aal.nii.gz"))
    grouped = grouped_aal(sitk.GetArrayFromImage(aal))
    spacing = (float(spacing_mm),) * 3
    t1_low = resample_to_spacing(t1, spacing)
    indicators = []
    for value in LABELS.values():
        indicator = copy_geometry_from_array((grouped == value).astype(np.float32), aal)
        indicators.append(sitk.GetArrayFromImage(resample_to_spacing(indicator, spacing)))
    label = np.argmax(np.stack(indicators), axis=0).astype(np.uint8)
    return t1_low, copy_geometry_from_array(label, t1_low)


def build_colin27_regions(raw_root: str | os.PathLike, dataset_id: int, name: str = "Colin27Regions",
                          spacing_mm: float = 3.0, num_cases: int = 10, seed: int = 0,
                          templates: str | os.PathLike | None = None) -> Path:
    """Write the REAL-derived Colin27 / AAL dataset (channel "T1"; labels cortex, deep_grey_matter,
    cerebellum); return its folder. See the module docstring for what is real and what is derived."""
    if num_cases < 1:
        raise ValueError("num_cases must be >= 1")
    t1, label = colin27_volume(spacing_mm, templates)
    cases, boxes = template_crops(t1, label, name, num_cases, seed)
    return write_nnunet_dataset(
        raw_root, dataset_id, name, cases, ["T1"], LABELS,
        extra={"description": "REAL-derived: crops of the Colin27 T1 (one subject) with AAL regions grouped into "
                              "cortex, deep grey matter and cerebellum; mild gamma/scale per case",
               "reference": "Holmes et al., J Comput Assist Tomogr 1998 (Colin27); Tzourio-Mazoyer et al., "
                            "NeuroImage 2002 (AAL); from Debian's mricron-data package",
               "licence": "mricron-data: BSD-3-Clause per Debian's copyright file (/usr/share/doc/mricron-data/"
                          "copyright); cite Colin27 and AAL",
               "spacing_mm": float(spacing_mm), "seed": seed, "case_crops": boxes})
