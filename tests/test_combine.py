"""Tests for `moe_nnunet combine`: real lung CT + brain MRI into one tagged dataset, refusals, experts per modality."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from moe_nnunet.cli import main
from moe_nnunet.datasets.combine import (MODALITY_KEY, TAG_FILE, annotated_label_values, combine_datasets,
                                         experts_from_dataset_json,
                                         read_modality_tags)
from moe_nnunet.datasets.common import same_geometry, write_nnunet_dataset
from conftest import NNUNetEnv, forked_pools
from test_datasets import check_integrity

CT_ID, MRI_ID, LESION_ID = 971, 972, 973
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture(autouse=True)
def no_nnunet_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's own nnU-Net folders must not take part (combine checks them for id clashes)."""
    for var in NNUNET_VARS:
        monkeypatch.delenv(var, raising=False)


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def synthetic(raw: Path, dataset_id: int, name: str, channels: list[str], labels: dict[str, int],
              num_cases: int = 2) -> Path:
    """A small dataset: random intensities; label value v fills slab v (z) of the volume."""
    rng = np.random.default_rng(dataset_id)
    cases = []
    for i in range(num_cases):
        images = [sitk.GetImageFromArray(rng.normal(100 * (c + 1), 20, (4, 6, 6)).astype(np.float32))
                  for c in range(len(channels))]
        lab = np.zeros((4, 6, 6), np.uint8)
        for v in labels.values():
            lab[v] = v
        label = sitk.GetImageFromArray(lab)
        for img in (*images, label):
            img.SetSpacing((0.8, 0.8, 2.5))
            img.SetOrigin((10.0, -4.0, 3.0))
        cases.append((f"{name}_{i:03d}", images, label))
    return write_nnunet_dataset(raw, dataset_id, name, cases, channels, labels)


# ----------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory: pytest.TempPathFactory) -> NNUNetEnv:
    """nnU-Net folders of this module only: its fingerprints and plans must not leak into other tests."""
    return NNUNetEnv(tmp_path_factory.mktemp("combine"))


@pytest.fixture(scope="module")
def sources(nnunet_env) -> tuple[Path, Path]:
    """Small real lung CT and brain MRI lesion datasets (pyradiomics data in the default download cache)."""
    from moe_nnunet.datasets import build_brain_mri, build_lung_ct, fetch_pyradiomics_data
    try:
        fetch_pyradiomics_data()
    except (RuntimeError, OSError) as e:                          # no access to PyPI: nothing to test
        pytest.skip(f"pyradiomics sdist not available: {e}")
    return (build_lung_ct(nnunet_env.raw, CT_ID, num_cases=5, crop_size_zyx=(16, 48, 48)),
            build_brain_mri(nnunet_env.raw, MRI_ID, num_cases=5, crop_size_zyx=(8, 48, 48)))


@pytest.fixture(scope="module")
def lesion(nnunet_env, sources) -> Path:
    before = [digest(s) for s in sources]
    with pytest.MonkeyPatch.context() as mp:
        for var in NNUNET_VARS:
            mp.delenv(var, raising=False)
        folder = combine_datasets([str(CT_ID), sources[1].name], LESION_ID, "Lesion", raw_root=nnunet_env.raw)
    assert [digest(s) for s in sources] == before, "inputs must never be modified"
    return folder


def test_combined_is_valid_nnunet_dataset(lesion: Path, capfd, monkeypatch) -> None:
    check_integrity(lesion, capfd, monkeypatch)
    ds = json.loads((lesion / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "zscore"}
    assert ds["labels"] == {"background": 0, "lesion": 1}
    assert ds["numTraining"] == 10 and ds["file_ending"] == ".nii.gz"
    tags = read_modality_tags(ds)
    assert tags == json.loads((lesion / TAG_FILE).read_text())
    assert tags["modalities"] == ["CT", "MRI"]
    assert tags["sources"]["CT"]["dataset"] == f"Dataset{CT_ID:03d}_LungCTLesion"
    assert tags["sources"]["MRI"]["dataset"] == f"Dataset{MRI_ID:03d}_BrainMRILesion"
    assert {s["normalisation"] for s in tags["sources"].values()} == {"per-case z-score (nnU-Net zscore)"}
    written = sorted(p.name[:-len("_0000.nii.gz")] for p in (lesion / "imagesTr").iterdir())
    assert written == sorted(tags["case_modality"])
    assert tags["case_modality"] == {c: c.split("_")[0] for c in written}
    assert read_modality_tags({"channel_names": {"0": "CT"}}) is None


def test_images_unchanged_labels_and_geometry_preserved(lesion: Path, sources: tuple[Path, Path]) -> None:
    tags = read_modality_tags(json.loads((lesion / "dataset.json").read_text()))
    by_tag = dict(zip(tags["modalities"], sources))
    for case_id, tag in tags["case_modality"].items():
        src_id = case_id[len(tag) + 1:]
        src_img = sitk.ReadImage(str(by_tag[tag] / "imagesTr" / f"{src_id}_0000.nii.gz"))
        img = sitk.ReadImage(str(lesion / "imagesTr" / f"{case_id}_0000.nii.gz"))
        lab = sitk.ReadImage(str(lesion / "labelsTr" / f"{case_id}.nii.gz"))
        assert img.GetPixelID() == src_img.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(src_img))
        assert same_geometry(img, src_img, tol=0) and same_geometry(lab, img, tol=0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab),
                                      read(by_tag[tag] / "labelsTr" / f"{src_id}.nii.gz"))


@pytest.fixture(scope="module")
def lesion_plans(nnunet_env, lesion: Path) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        return plan_in_process(nnunet_env, LESION_ID, mp)


def test_nnunet_zscores_each_case_without_its_tag(lesion: Path, lesion_plans: dict) -> None:
    """nnU-Net's preprocessing, as nnUNetv2_predict runs it on a new image (no label, no tag), standardises a raw
    CT and a raw MRI case by their own statistics: one model, raw images of either modality."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(lesion_plans)
    config = plans.get_configuration("3d_fullres")
    assert config.normalization_schemes == ["ZScoreNormalization"]
    dataset_json = json.loads((lesion / "dataset.json").read_text())
    case_modality = dataset_json.pop(MODALITY_KEY)["case_modality"]
    raw_means = {}
    for tag in ("CT", "MRI"):
        case_id = next(c for c, t in case_modality.items() if t == tag)
        image = lesion / "imagesTr" / f"{case_id}_0000.nii.gz"
        raw_means[tag] = read(image).mean()
        data, seg, _ = DefaultPreprocessor(verbose=False).run_case([str(image)], None, plans, config, dataset_json)
        values = data[0][seg[0] >= 0] if config.use_mask_for_norm[0] else data[0]
        # normalised before resampling to the plans' spacing, so close to, not exactly, 0 and 1
        assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1, (tag, values.mean(), values.std())
    assert raw_means["CT"] < -100 < 100 < raw_means["MRI"], raw_means     # HU and MRI units, far apart raw


def test_nnunet_keeps_tags_and_planner_makes_one_expert_per_modality(nnunet_env, lesion: Path,
                                                                     lesion_plans: dict) -> None:
    plans = lesion_plans
    copied = json.loads((nnunet_env.preprocessed / lesion.name / "dataset.json").read_text())
    assert copied[MODALITY_KEY] == json.loads((lesion / TAG_FILE).read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == ["ZScoreNormalization"]
    kwargs = config["architecture"]["arch_kwargs"]
    assert kwargs["expert_channels"] == [[0], [0]] and kwargs["expert_names"] == ["CT", "MRI"]
    assert experts_from_dataset_json(copied) == ([[0], [0]], ["CT", "MRI"])

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = config["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 input_channels=1, output_channels=2, deep_supervision=True)
    assert net.expert_names == ["CT", "MRI"] and net.expert_channels == [[0], [0]]


def test_one_expert_per_channel_otherwise() -> None:
    """Without modality tags, one expert per channel, named after it (the planner's plans for such a dataset,
    made by `moe_nnunet plan`, are checked in test_end_to_end.py::test_plans_name_our_network_with_swin_valid_patch).
    """
    plain = {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"}, "labels": {"background": 0, "a": 1}}
    assert experts_from_dataset_json(plain) == ([[0], [1], [2]], ["T1", "T2", "FLAIR"])


def plan_in_process(nnunet_env, dataset_id: int, monkeypatch) -> dict:
    """Integrity check and fingerprint (as `nnUNetv2_extract_fingerprint --verify_dataset_integrity`), then M4oE
    plans, in this process with forked workers. The fingerprint samples 1e5 foreground intensities instead of
    nnU-Net's 1e8 (which take 10-40 s here); the planner does not read them."""
    from nnunetv2.experiment_planning import verify_dataset_integrity
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)
    from moe_nnunet.planners import M4oEPlanner

    for var, folder in zip(NNUNET_VARS, (nnunet_env.raw, nnunet_env.preprocessed, nnunet_env.results)):
        monkeypatch.setenv(var, str(folder))
    forked_pools(monkeypatch, verify_dataset_integrity, fingerprint_extractor)
    class FewSamples(fingerprint_extractor.DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    extract_fingerprint_dataset(dataset_id, FewSamples, num_processes=1, check_dataset_integrity=True, clean=False,
                                verbose=False, show_progress_bar=False)
    _, plans_name = plan_experiment_dataset(dataset_id, M4oEPlanner)
    folder = next(nnunet_env.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    return json.loads((folder / f"{plans_name}.json").read_text())


# ----------------------------------------------------------------------------------------------------- refusals


LESION = {"background": 0, "lesion": 1}


def test_labels_mapped_by_name(tmp_path: Path) -> None:
    a = synthetic(tmp_path, 1, "A", ["CT"], {"background": 0, "lesion": 1, "vessel": 2})
    b = synthetic(tmp_path, 2, "B", ["MRI"], {"background": 0, "vessel": 1, "lesion": 2})
    folder = combine_datasets([1, 2], 3, "AB", raw_root=tmp_path)
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1,
                                                                            "vessel": 2}
    src, out = read(b / "labelsTr" / "B_000.nii.gz"), read(folder / "labelsTr" / "MRI_B_000.nii.gz")
    np.testing.assert_array_equal(out, np.choose(src, [0, 2, 1]))
    np.testing.assert_array_equal(read(folder / "labelsTr" / "CT_A_001.nii.gz"), read(a / "labelsTr" / "A_001.nii.gz"))


def test_partial_labels_make_the_union_and_record_what_each_dataset_annotates(tmp_path: Path) -> None:
    """Overlapping and disjoint label sets: the union by name, each source's annotated labels recorded, source
    values mapped; a --rename makes two names one structure."""
    synthetic(tmp_path, 1, "Liver", ["CT"], {"background": 0, "liver": 1, "tumour": 2})
    synthetic(tmp_path, 2, "Abdomen", ["MRI"], {"background": 0, "spleen": 1, "liver": 2})
    synthetic(tmp_path, 3, "Lesions", ["PET"], {"background": 0, "lesion": 1})
    folder = combine_datasets([1, 2, 3], 10, "Union", raw_root=tmp_path)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "tumour": 2, "spleen": 3, "lesion": 4}
    tags = read_modality_tags(dataset_json)
    assert tags["annotated_labels"] == {"CT": ["liver", "tumour"], "MRI": ["liver", "spleen"], "PET": ["lesion"]}
    assert annotated_label_values(dataset_json) == {"CT": [0, 1, 2], "MRI": [0, 1, 3], "PET": [0, 4]}
    src = read(tmp_path / "Dataset002_Abdomen" / "labelsTr" / "Abdomen_000.nii.gz")
    np.testing.assert_array_equal(read(folder / "labelsTr" / "MRI_Abdomen_000.nii.gz"), np.choose(src, [0, 3, 1]))
    assert json.loads((folder / "modalities.json").read_text()) == tags

    renamed = combine_datasets([1, 3], 11, "Renamed", raw_root=tmp_path, renames=["3:lesion=tumour"])
    renamed_json = json.loads((renamed / "dataset.json").read_text())
    assert renamed_json["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert annotated_label_values(renamed_json) == {"CT": [0, 1, 2], "PET": [0, 2]}
    # every dataset annotating every label: no partial labels recorded
    same = combine_datasets([1, 2], 12, "Same", raw_root=tmp_path, renames=["1:tumour=spleen"])
    assert annotated_label_values(json.loads((same / "dataset.json").read_text())) is None
    for renames, message in ((["3:organ=tumour"], r"Dataset003_Lesions has no label 'organ'.*lesion"),
                             (["7:lesion=tumour"], r"'7' names none of the datasets"),
                             (["1:liver=tumour"], r"already has a label 'tumour'"),
                             (["lesion=tumour"], r"write DATASET:OLD=NEW")):
        with pytest.raises(ValueError, match=message):
            combine_datasets([1, 3], 13, "Refused", raw_root=tmp_path, renames=renames)
    assert not list(tmp_path.glob("*Refused*"))


def test_refusals(tmp_path: Path) -> None:
    synthetic(tmp_path, 1, "LungCT", ["CT"], LESION)
    synthetic(tmp_path, 2, "BrainTumour", ["MRI"], {"background": 0, "tumour": 1})
    synthetic(tmp_path, 3, "TwoChannel", ["T1", "T2"], LESION)
    synthetic(tmp_path, 4, "OtherCT", ["CT"], LESION)
    synthetic(tmp_path, 5, "BrainMRI", ["MRI"], LESION)
    cases = [
        ([1, 3], None, r"Dataset003_TwoChannel has 2 channels.*single-channel.*one dataset per channel"),
        ([1, 4], None, r"same modality tag 'CT'.*--modalities.*merge"),
        ([1, 4], ["CT", "ct"], r"same modality tag"),
        ([1, 5], ["CT"], r"1 modalities for 2 datasets"),
        ([1, 99], None, r"cannot find dataset '99'|Dataset099_\S+ has no raw folder"),
    ]
    for datasets, tags, message in cases:
        with pytest.raises(ValueError, match=message):
            combine_datasets(datasets, 10, "Out", tags, raw_root=tmp_path)
    assert not list(tmp_path.glob("*Out*")), "a refused combination must write nothing"
    # two datasets of one modality are fine once tagged apart
    tags = read_modality_tags(json.loads(
        (combine_datasets([1, 4], 10, "Out", ["CT-a", "CT-b"], raw_root=tmp_path) / "dataset.json").read_text()))
    assert tags["modalities"] == ["CT-a", "CT-b"]
    before = digest(tmp_path / "Dataset010_Out")
    for new_id, name, message in ((10, "Out", r"Dataset010_Out already exists; choose another id/name, or remove"),
                                  (10, "Other", r"dataset id 10 is already used")):
        with pytest.raises(FileExistsError, match=message):
            combine_datasets([1, 5], new_id, name, raw_root=tmp_path)
    assert digest(tmp_path / "Dataset010_Out") == before


def test_region_labels_refused(tmp_path: Path) -> None:
    folder = synthetic(tmp_path, 1, "Regions", ["CT"], LESION)
    synthetic(tmp_path, 2, "Plain", ["MRI"], LESION)
    ds = json.loads((folder / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    ds["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ValueError, match=r"Dataset001_Regions uses region-based labels.*'whole': \[1, 2\]"):
        combine_datasets([1, 2], 3, "Out", raw_root=tmp_path)


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    synthetic(tmp_path, 1, "Good", ["CT"], LESION)
    bad = synthetic(tmp_path, 2, "Bad", ["MRI"], LESION)
    label = sitk.ReadImage(str(bad / "labelsTr" / "Bad_001.nii.gz"))
    values = sitk.GetArrayFromImage(label)
    values[0, :2] = 3                                  # a value dataset.json does not declare, in the last case
    fixed = sitk.GetImageFromArray(values)
    fixed.CopyInformation(label)
    sitk.WriteImage(fixed, str(bad / "labelsTr" / "Bad_001.nii.gz"))
    before = digest(bad)
    with pytest.raises(ValueError, match=r"Dataset002_Bad: case Bad_001 holds label values \[3\] that its "
                                         r"dataset.json does not declare"):
        combine_datasets([1, 2], 3, "Out", raw_root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_Good", "Dataset002_Bad"]
    assert digest(bad) == before


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synthetic(tmp_path, 1, "LungCT", ["CT"], LESION)
    synthetic(tmp_path, 2, "BrainMRI", ["MRI"], LESION)
    synthetic(tmp_path, 3, "BrainTumour", ["MRI"], {"background": 0, "tumour": 1})
    raw = ["--raw", str(tmp_path)]
    assert main(["combine", "-d", "1", "2", "-o", "4", "--name", "Lesion", *raw]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "Dataset004_Lesion") in out and "moe_nnunet plan -d 4" in out
    assert main(["combine", "-d", "1", "3", "-o", "5", "--name", "X", *raw]) == 0  # partial labels
    out = capsys.readouterr().out
    assert "CT: 2 cases from Dataset001_LungCT, annotating lesion" in out and "partial labels" in out
    assert main(["combine", "-d", "1", "3", "-o", "7", "--name", "Z", "--rename", "3:tumor=lesion", *raw]) == 1
    assert "moe_nnunet combine: error: --rename 3:tumor=lesion: Dataset003_BrainTumour has no label 'tumor'" in \
        capsys.readouterr().err
    assert main(["combine", "-d", "1", "2", "-o", "4", "--name", "Lesion", *raw]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["combine", "-d", "1", "2", "-o", "6", "--name", "Y", "--modalities", "CT", *raw]) == 2
    assert "one tag per -d dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["combine", "-d", "1", "2", "--name", "Y"])
    assert e.value.code == 2
