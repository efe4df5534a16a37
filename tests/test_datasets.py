"""Tests for moe_nnunet.datasets: valid nnU-Net raw datasets, exact crop geometry, phantom channel semantics."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import forked_pools
from moe_nnunet.datasets import DATASETS, build_dataset
from moe_nnunet.datasets.common import crop, random_crop_start, resample_to_spacing, write_nnunet_dataset
from moe_nnunet.datasets.phantom import build_phantom


# ----------------------------------------------------------------------------------------------------- helpers


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def case_arrays(folder: Path, case_id: str, num_channels: int) -> tuple[list[np.ndarray], np.ndarray]:
    images = [read(folder / "imagesTr" / f"{case_id}_{c:04d}.nii.gz") for c in range(num_channels)]
    return images, read(folder / "labelsTr" / f"{case_id}.nii.gz")


def check_integrity(folder: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's own dataset check; its workers print (not raise) geometry warnings, so read the output too."""
    from nnunetv2.experiment_planning import verify_dataset_integrity as module

    forked_pools(monkeypatch, module)
    capfd.readouterr()
    module.verify_dataset_integrity(str(folder), num_processes=1)
    out = capfd.readouterr()
    text = (out.out + out.err).lower()
    assert "verify_dataset_integrity done" in text
    assert "warning:" not in text and "error:" not in text, text


def declared_labels_only(folder: Path) -> set[int]:
    """Assert every label file holds only declared labels; return the union of values seen."""
    declared = set(json.loads((folder / "dataset.json").read_text())["labels"].values())
    seen: set[int] = set()
    for f in sorted((folder / "labelsTr").glob("*.nii.gz")):
        values = set(np.unique(read(f)).tolist())
        assert values <= declared, (f, values, declared)
        seen |= values
    return seen


def best_threshold_dice(x: np.ndarray, target: np.ndarray, interval: bool = False, bins: int = 256) -> float:
    """Best Dice of ``x >= t`` or ``x < t`` (or, with ``interval``, ``a <= x < b``) against ``target``."""
    x, t = x.ravel(), target.ravel().astype(bool)
    edges = np.linspace(x.min(), x.max() + 1e-6, bins + 1)
    b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    ca = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=bins))])
    ct = np.concatenate([[0], np.cumsum(np.bincount(b[t], minlength=bins))])
    if interval:
        pred, tp = ca[None, :] - ca[:, None], ct[None, :] - ct[:, None]
    else:
        pred, tp = np.concatenate([ca[-1] - ca, ca]), np.concatenate([ct[-1] - ct, ct])
    dice = np.where(pred > 0, 2 * tp / np.maximum(pred + t.sum(), 1), 0.0)
    return float(dice.max())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def assert_same_physical_voxels(cropped: sitk.Image, source: sitk.Image, start_zyx, rng, n: int = 50,
                                compare_values: bool = True) -> None:
    """Voxel i of ``cropped`` is voxel start+i of ``source``: same physical point (and same value)."""
    size = cropped.GetSize()
    for _ in range(n):
        idx = [int(rng.integers(0, s)) for s in size]
        src_idx = [i + s for i, s in zip(idx, start_zyx[::-1])]
        p = cropped.TransformIndexToPhysicalPoint(idx)
        np.testing.assert_allclose(p, source.TransformIndexToPhysicalPoint(src_idx), atol=1e-4)  # NIfTI: float32
        assert source.TransformPhysicalPointToIndex(p) == tuple(src_idx)
        assert not compare_values or cropped[idx] == source[src_idx]
    assert np.allclose(cropped.GetSpacing(), source.GetSpacing())
    assert np.allclose(cropped.GetDirection(), source.GetDirection())


# ----------------------------------------------------------------------------------------------------- common


def test_crop_preserves_geometry() -> None:
    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.normal(size=(20, 30, 40)).astype(np.float32))
    img.SetSpacing((0.7, 1.3, 4.0))
    img.SetOrigin((-12.0, 33.0, 7.5))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    img.SetDirection(q.ravel().tolist())
    start, size = (3, 5, 11), (12, 20, 25)
    cropped = crop(img, start, size)
    assert cropped.GetSize() == size[::-1]
    assert_same_physical_voxels(cropped, img, start, rng)
    with pytest.raises(ValueError):
        crop(img, (10, 0, 0), (12, 5, 5))


def test_random_crop_start_contains_region() -> None:
    rng = np.random.default_rng(0)
    lo, hi = np.array([30, 40, 50]), np.array([34, 70, 60])
    starts = [random_crop_start((48, 200, 200), (32, 96, 96), rng, lo, hi) for _ in range(50)]
    for s in starts:
        assert all(s_ <= l - 2 and s_ + c >= h + 3 for s_, l, h, c in zip(s, lo, hi, (32, 96, 96)))
    assert len(set(starts)) > 10                                    # offsets really vary


def test_resample_keeps_extent_and_origin() -> None:
    img = sitk.GetImageFromArray(np.ones((10, 100, 80), np.int16))
    img.SetSpacing((0.6, 0.6, 5.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    out = resample_to_spacing(img, (5.0, 1.2, 1.2))
    assert out.GetSize() == (40, 50, 10) and out.GetOrigin() == img.GetOrigin()
    assert np.allclose(sitk.GetArrayViewFromImage(out)[2:-2, 2:-2, 2:-2], 1.0)


def test_write_nnunet_dataset_rejects_bad_input(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    lab = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    shifted = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    shifted.SetOrigin((1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="consecutive"):
        write_nnunet_dataset(tmp_path, 5, "Bad", [("a", [img], lab)], ["T1"], {"background": 0, "x": 2})
    with pytest.raises(ValueError, match="geometry"):
        write_nnunet_dataset(tmp_path, 6, "Bad", [("a", [img], shifted)], ["T1"], {"background": 0, "x": 1})
    bad_values = sitk.GetImageFromArray(np.full((4, 5, 6), 3, np.uint8))
    with pytest.raises(ValueError, match="label values"):
        write_nnunet_dataset(tmp_path, 7, "Bad", [("a", [img], bad_values)], ["T1"], {"background": 0, "x": 1})
    folder = write_nnunet_dataset(tmp_path, 8, "Good", [("a", [img], lab)], ["T1"], {"background": 0, "x": 1})
    assert folder.name == "Dataset008_Good" and (folder / "labelsTr" / "a.nii.gz").is_file()
    with pytest.raises(FileExistsError):                             # same id, other name
        write_nnunet_dataset(tmp_path, 8, "Other", [("a", [img], lab)], ["T1"], {"background": 0, "x": 1})


# ----------------------------------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    t0 = time.perf_counter()
    folder = build_phantom(tmp_path_factory.mktemp("raw"), 901, num_cases=10)
    return folder, time.perf_counter() - t0


def test_phantom_is_valid_nnunet_dataset(phantom, capfd, monkeypatch) -> None:
    folder, seconds = phantom
    assert seconds < 10.0, f"building 10 phantom cases took {seconds:.1f} s"
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    assert ds["labels"] == {"background": 0, "t1_blob": 1, "t2_blob": 2, "flair_blob": 3, "t2_flair_combo": 4}
    assert ds["numTraining"] == 10 and ds["file_ending"] == ".nii.gz"
    assert declared_labels_only(folder) == {0, 1, 2, 3, 4}
    img = sitk.ReadImage(str(folder / "imagesTr" / "MultiModalPhantom_000_0002.nii.gz"))
    assert img.GetSize() == (48, 48, 32) and np.allclose(img.GetSpacing(), (1.0, 1.0, 2.0))
    desc = json.loads((folder / "phantom_description.json").read_text())
    assert desc["synthetic"] is True
    assert desc["label_channels"] == {"t1_blob": ["T1"], "t2_blob": ["T2"], "flair_blob": ["FLAIR"],
                                      "t2_flair_combo": ["T2", "FLAIR"]}
    check_integrity(folder, capfd, monkeypatch)


def test_phantom_labels_recoverable_only_from_their_channels(phantom) -> None:
    folder, _ = phantom
    desc = json.loads((folder / "phantom_description.json").read_text())
    channels = desc["channels"]
    for i in range(4):
        images, label = case_arrays(folder, f"MultiModalPhantom_{i:03d}", len(channels))
        for name, info in desc["labels"].items():
            target = label == info["value"]
            assert target.sum() >= 20
            for c, ch in enumerate(channels):
                d = best_threshold_dice(images[c], target)
                if info["visible_in"] == [ch]:
                    assert d > 0.8, (i, name, ch, d)
                else:                                              # invisible, or only half of what identifies it
                    limit = 0.65 if ch in info["visible_in"] else 0.3
                    assert d < limit and best_threshold_dice(images[c], target, interval=True) < limit, \
                        (i, name, ch, d)
        # the combination label: moderately bright in T2 AND dark in FLAIR, with intensities per case normalised
        ref = [np.median(x[x > 0.3 * np.percentile(x, 75)]) for x in images]   # tissue level of this case
        t2, flair = images[1] / ref[1], images[2] / ref[2]
        combo = (t2 > 1.3) & (t2 < 2.1) & (flair < 0.65)
        assert dice(combo, label == desc["labels"]["t2_flair_combo"]["value"]) > 0.8


def test_phantom_intensity_scale_varies_between_cases(phantom) -> None:
    folder, _ = phantom
    medians = np.array([[np.median(x[x > 0.3 * np.percentile(x, 75)])
                         for x in case_arrays(folder, f"MultiModalPhantom_{i:03d}", 3)[0]] for i in range(10)])
    assert (medians.max(0) / medians.min(0) > 3).all()


def test_brats_phantom_labels_need_several_channels(tmp_path: Path) -> None:
    """Each BraTS-like label is ambiguous in any one channel (best intensity window per case) and found by the
    two-channel rule its docstring states."""
    from moe_nnunet.datasets.brats_phantom import CHANNELS, LABELS, build_brats_phantom

    folder = build_brats_phantom(tmp_path, 908, num_cases=4)
    desc = json.loads((folder / "phantom_description.json").read_text())
    assert desc["synthetic"] and desc["channels"] == list(CHANNELS) and set(desc["label_needs"]) < set(LABELS)
    grid = np.linspace(1.1, 1.8, 15)
    for i in range(4):
        images, label = case_arrays(folder, f"BraTSPhantom_{i:03d}", 4)
        assert images[0].shape == (8, 80, 80) and set(np.unique(label)) == {0, 1, 2, 3}
        brain = images[0] > 0.3 * np.percentile(images[0], 75)
        t1, t1c, t2, flair = (x / np.median(x[brain]) for x in images)
        oedema_or_rim = (label == LABELS["edema"]) | (label == LABELS["enhancing_tumour"])  # equal in T2 and FLAIR
        enhancing, core = label == LABELS["enhancing_tumour"], label == LABELS["non_enhancing_core"]
        for x in images:
            assert best_threshold_dice(x, oedema_or_rim, interval=True) < 0.85
            assert best_threshold_dice(x, enhancing, interval=True) < 0.65
            assert best_threshold_dice(x, core, interval=True) < 0.7
        assert max(dice((t2 > a) & (flair > b), oedema_or_rim) for a in grid for b in grid) > 0.93
        assert max(dice((t1c > a) & (t2 > b), enhancing) for a in grid for b in grid - 0.3) > 0.93


def test_phantom_other_channel_counts(tmp_path: Path) -> None:
    folder = build_phantom(tmp_path, 911, name="TwoChannel", num_cases=2, channels=("A", "B"))
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "a_blob": 1, "b_blob": 2}
    with pytest.raises(ValueError, match="normalisation"):
        build_phantom(tmp_path, 912, channels=("CT", "T2"))


# ----------------------------------------------------------------------------------------------------- ICBM


def test_icbm_tissue(tmp_path: Path, capfd, monkeypatch) -> None:
    pytest.importorskip("nilearn")
    from moe_nnunet.datasets.nilearn_tissue import build_icbm_tissue, icbm_tissue_volume

    folder = build_icbm_tissue(tmp_path, 902, num_cases=4, augment=False)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1"} and ds["numTraining"] == 4
    assert declared_labels_only(folder) == {0, 1, 2}
    check_integrity(folder, capfd, monkeypatch)

    t1, label = icbm_tissue_volume(3.0)
    fractions = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=3) / label.GetNumberOfPixels()
    assert 0.1 < fractions[1] < 0.4 and 0.05 < fractions[2] < 0.3                # GM, WM share of the 3 mm grid
    rng = np.random.default_rng(0)
    shapes = set()
    for case_id, box in ds["case_crops"].items():
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))
        assert np.allclose(img.GetSpacing(), (3.0, 3.0, 3.0))
        assert_same_physical_voxels(img, t1, box["start_zyx"], rng)
        assert_same_physical_voxels(lab, label, box["start_zyx"], rng)
        shapes.add(img.GetSize())
    assert len(shapes) > 1                                                      # crop sizes vary


def test_icbm_flair_lesions(tmp_path: Path, capfd, monkeypatch) -> None:
    """T1 real (the template's voxels), lesions visible in the simulated FLAIR only, valid for nnU-Net."""
    pytest.importorskip("nilearn")
    from moe_nnunet.datasets.icbm_flair import build_icbm_flair_lesions
    from moe_nnunet.datasets.nilearn_tissue import icbm_maps

    folder = build_icbm_flair_lesions(tmp_path, 906, num_cases=4)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1", "1": "FLAIR"} and ds["numTraining"] == 4
    assert declared_labels_only(folder) == {0, 1, 2, 3}
    check_integrity(folder, capfd, monkeypatch)
    t1_template, _ = icbm_maps(4.0)
    rng = np.random.default_rng(0)
    for case_id, box in ds["case_crops"].items():
        (t1, flair), label = case_arrays(folder, case_id, 2)
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))
        assert np.allclose(img.GetSpacing(), (4.0, 4.0, 4.0))
        assert_same_physical_voxels(img, t1_template, box["start_zyx"], rng, compare_values=False)
        lesion, wm = label == 3, label == 2
        assert lesion.sum() == box["lesion_voxels"] >= 20
        assert best_threshold_dice(flair, lesion) > 0.6, case_id           # FLAIR: bright lesions
        assert best_threshold_dice(t1, lesion) < 0.2, case_id              # T1: lesions look like white matter
        assert abs(t1[lesion].mean() / t1[wm].mean() - 1) < 0.1


def test_colin27_regions(tmp_path: Path, capfd, monkeypatch) -> None:
    """Debian's mricron-data: Colin27 T1 with grouped AAL labels, valid for nnU-Net, crops at the right place."""
    from moe_nnunet.datasets.colin27 import build_colin27_regions, colin27_volume, mricron_templates

    try:
        mricron_templates()
    except FileNotFoundError as e:
        assert "apt-get install mricron-data" in str(e)
        pytest.skip(str(e))
    folder = build_colin27_regions(tmp_path, 907, num_cases=3, spacing_mm=4.0)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "cortex": 1, "deep_grey_matter": 2, "cerebellum": 3}
    assert declared_labels_only(folder) == {0, 1, 2, 3}
    check_integrity(folder, capfd, monkeypatch)
    t1, label = colin27_volume(4.0)
    fractions = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=4) / label.GetNumberOfPixels()
    assert 0.1 < fractions[1] < 0.3 and 0.003 < fractions[2] < 0.02 and 0.01 < fractions[3] < 0.05
    rng = np.random.default_rng(0)
    for case_id, box in ds["case_crops"].items():
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))
        assert_same_physical_voxels(img, t1, box["start_zyx"], rng, compare_values=False)
        assert_same_physical_voxels(lab, label, box["start_zyx"], rng)


# ----------------------------------------------------------------------------------------------------- pyradiomics


@pytest.fixture(scope="module")
def pyradiomics_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_nnunet.datasets.pyradiomics_lesions import fetch_pyradiomics_data

    cache = tmp_path_factory.mktemp("cache")
    try:
        return fetch_pyradiomics_data(cache)
    except (RuntimeError, OSError) as e:                          # no access to PyPI: nothing to test
        pytest.skip(f"pyradiomics sdist not available: {e}")


def test_fetch_pyradiomics_data_caches(pyradiomics_data: Path) -> None:
    from moe_nnunet.datasets.pyradiomics_lesions import fetch_pyradiomics_data

    t0 = time.perf_counter()
    assert fetch_pyradiomics_data(pyradiomics_data.parent.parent) == pyradiomics_data
    assert time.perf_counter() - t0 < 0.5
    for subject in ("lung1", "lung2", "brain1", "brain2"):
        assert set(np.unique(read(pyradiomics_data / f"{subject}_label.nrrd")).tolist()) == {0, 1}


@pytest.mark.parametrize("which", ["lung_ct", "brain_mri"])
def test_lesion_datasets(which: str, pyradiomics_data: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    from moe_nnunet.datasets.pyradiomics_lesions import load_subject

    cache = pyradiomics_data.parent.parent
    folder = build_dataset(which, raw_root=tmp_path, num_cases=4, cache_dir=cache)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT" if which == "lung_ct" else "MRI"}
    assert ds["labels"] == {"background": 0, "lesion": 1}
    assert declared_labels_only(folder) == {0, 1}
    check_integrity(folder, capfd, monkeypatch)
    rng = np.random.default_rng(0)
    for case_id, src in list(ds["case_sources"].items())[:2]:          # one crop per subject
        image, label = load_subject(pyradiomics_data, src["subject"], ds["spacing_zyx"], ds["context_mm"])
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))
        assert_same_physical_voxels(img, image, src["start_zyx"], rng)
        assert_same_physical_voxels(lab, label, src["start_zyx"], rng)
        # every crop holds the subject's whole lesion
        whole = int(sitk.GetArrayViewFromImage(label).sum())
        assert whole > 0 and int(sitk.GetArrayViewFromImage(lab).sum()) == whole
        assert np.prod(img.GetSize()) <= 48 * 96 * 96
    assert len({tuple(s["start_zyx"]) for s in ds["case_sources"].values()}) == 4


# ----------------------------------------------------------------------------------------------------- registry, CLI


def test_registry_and_raw_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert set(DATASETS) == {"phantom", "brats_phantom", "icbm_tissue", "icbm_flair_lesions", "colin27_regions",
                             "lung_ct", "brain_mri"}
    assert sorted(s.default_id for s in DATASETS.values()) == [901, 902, 903, 904, 906, 907, 908]  # unique
    assert all(s.kind in ("synthetic", "real-derived") for s in DATASETS.values())
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ValueError, match="nnUNet_raw"):
        build_dataset("phantom")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("nope", raw_root=tmp_path)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert build_dataset("phantom", num_cases=1) == tmp_path / "Dataset901_MultiModalPhantom"


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moe_nnunet.commands import datasets as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["datasets", "list"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in DATASETS) and "synthetic" in table and "real-derived" in table
    args = parser.parse_args(["datasets", "build", "phantom", "--raw", str(tmp_path), "--num_cases", "2",
                              "--id", "950"])
    assert args.func(args) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written == tmp_path / "Dataset950_MultiModalPhantom"
    assert json.loads((written / "dataset.json").read_text())["numTraining"] == 2
