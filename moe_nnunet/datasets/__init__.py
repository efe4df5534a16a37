"""Builders that write small nnU-Net v2 raw datasets (``Dataset{id:03d}_{name}`` with imagesTr, labelsTr and
dataset.json) from a synthetic phantom or from real imaging data shipped inside PyPI packages.

``DATASETS`` lists them with whether their data is real, derived from real data, or synthetic;
``build_dataset(name, dataset_id, raw_root)`` builds one. See documentation/datasets.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moe_nnunet.datasets.brats_phantom import build_brats_phantom
from moe_nnunet.datasets.colin27 import build_colin27_regions
from moe_nnunet.datasets.common import resolve_raw_root, write_nnunet_dataset
from moe_nnunet.datasets.icbm_flair import build_icbm_flair_lesions
from moe_nnunet.datasets.nilearn_tissue import build_icbm_tissue
from moe_nnunet.datasets.phantom import build_phantom
from moe_nnunet.datasets.pyradiomics_lesions import build_brain_mri, build_lung_ct, fetch_pyradiomics_data


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder ``(raw_root, dataset_id, **kwargs) -> folder`` and what it contains."""

    builder: Callable[..., Path]
    kind: str            # "real-derived" or "synthetic"
    default_id: int
    description: str     # one line
    needs: str = ""      # what the builder needs beyond the core dependencies


DATASETS: dict[str, DatasetSpec] = {
    "phantom": DatasetSpec(
        build_phantom, "synthetic", 901,
        description="SYNTHETIC 3-channel (T1/T2/FLAIR-named) phantom; each label visible only in known channel(s)"),
    "brats_phantom": DatasetSpec(
        build_brats_phantom, "synthetic", 908,
        description="SYNTHETIC BraTS-like 4-channel (T1/T1c/T2/FLAIR) thin slabs for 2d: edema, core, enhancing rim, "
                    "each needing several channels, with look-alike decoys"),
    "icbm_tissue": DatasetSpec(
        build_icbm_tissue, "real-derived", 902, needs="pip install nilearn",
        description="REAL ICBM152 2009a T1 template (nilearn), GM/WM labels; cases are derived crops"),
    "icbm_flair_lesions": DatasetSpec(
        build_icbm_flair_lesions, "real-derived", 906, needs="pip install nilearn",
        description="REAL ICBM152 T1 + SIMULATED FLAIR (from its tissue maps) + SYNTHETIC WM lesions (FLAIR only)"),
    "colin27_regions": DatasetSpec(
        build_colin27_regions, "real-derived", 907, needs="apt-get install mricron-data (Debian/Ubuntu)",
        description="REAL Colin27 T1 (mricron-data), AAL grouped: cortex, deep grey matter, cerebellum; derived crops"),
    "lung_ct": DatasetSpec(
        build_lung_ct, "real-derived", 903, needs="PyPI access once (pyradiomics sdist)",
        description="REAL lung CT tumours (pyradiomics lung1/lung2); cases are derived crops"),
    "brain_mri": DatasetSpec(
        build_brain_mri, "real-derived", 904, needs="PyPI access once (pyradiomics sdist)",
        description="REAL brain MRI lesions (pyradiomics brain1/brain2); cases are derived crops"),
}


def build_dataset(name: str, dataset_id: int | None = None, raw_root: str | os.PathLike | None = None,
                  **kwargs) -> Path:
    """Build registered dataset ``name`` into ``raw_root`` (default: ``$nnUNet_raw``) and return its folder.

    ``dataset_id`` defaults to the dataset's ``default_id``; extra keyword arguments go to the builder
    (e.g. ``num_cases``, ``seed``).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    root = resolve_raw_root(raw_root)
    return spec.builder(root, spec.default_id if dataset_id is None else int(dataset_id), **kwargs)


__all__ = ["DATASETS", "DatasetSpec", "build_dataset", "build_phantom", "build_brats_phantom", "build_icbm_tissue",
           "build_lung_ct", "build_brain_mri", "build_colin27_regions", "build_icbm_flair_lesions",
           "fetch_pyradiomics_data", "write_nnunet_dataset"]
