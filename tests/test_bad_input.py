"""Bad input to `moe_nnunet predict`, `plan`, `merge` and `combine`: each is refused before anything is written,
with the file and the fix named, or (asked for) handled and said so.

The inputs are broken copies of the session's tiny dataset. The commands run in this process (`moe_nnunet.cli.main`)
with the session's nnU-Net folders in the environment; the plan tests copy a few cases to datasets of their own in
fresh nnU-Net folders, so the shared dataset never changes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PLANS, TINY_ID, TRAINER, NNUNetEnv
from moe_nnunet.cli import main

CASES = ["TinyPhantom_000", "TinyPhantom_001", "TinyPhantom_002"]
PREDICT = ["-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
           "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")


def digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones too) and its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def in_env(monkeypatch: pytest.MonkeyPatch, env: NNUNetEnv) -> None:
    for var in NNUNET_VARS:
        monkeypatch.setenv(var, env.env[var])


@pytest.fixture
def session_env(nnunet_env, trained, monkeypatch) -> NNUNetEnv:
    """The session's nnU-Net folders (with the trained model) as this process's environment."""
    in_env(monkeypatch, nnunet_env)
    return nnunet_env


@pytest.fixture
def inputs(tiny_dataset, tmp_path) -> Path:
    """An input folder with three good cases of the tiny dataset (3 channels each)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for case in CASES:
        for f in (tiny_dataset / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def output(tmp_path) -> Path:
    """An output folder holding an earlier prediction of another case."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "earlier_case.nii.gz").write_bytes(b"an earlier prediction")
    return folder


def predict(inputs: Path, output: Path, *extra: str, capsys) -> tuple[int, str, str]:
    code = main(["predict", "-i", str(inputs), "-o", str(output), *PREDICT, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def refused(inputs, output, capsys, *extra: str) -> str:
    """Predict, expect exit 1 with the output folder unchanged; returns stderr."""
    before = digest(output)
    code, _, err = predict(inputs, output, *extra, capsys=capsys)
    assert code == 1, err
    assert err.startswith("moe_nnunet predict: error:") and "nothing was" in err
    assert digest(output) == before
    return err


def rewrite(path: Path, change) -> None:
    """Write `path` again with its voxel array changed by `change` (same grid, float32)."""
    image = sitk.ReadImage(str(path))
    changed = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image).astype(np.float32)))
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(path))


# ------------------------------------------------------------------------------------------------ predict: inputs


def test_truncated_gzip_files_are_named_not_read_as_zeros(session_env, inputs, output, capsys):
    """SimpleITK reads a .nii.gz cut short as mostly zeros; here every cut file of every case is named at once."""
    cut = {inputs / f"{CASES[0]}_0000.nii.gz": 300, inputs / f"{CASES[1]}_0001.nii.gz": 1000,
           inputs / f"{CASES[2]}_0002.nii.gz": 40000}
    for path, size in cut.items():
        path.write_bytes(path.read_bytes()[:size])
    last = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs / f"{CASES[2]}_0002.nii.gz")))  # what stock reads
    assert (last == 0).mean() > 0.5
    err = refused(inputs, output, capsys)
    for path, size in cut.items():
        assert f"{path} is truncated: its gzip stream ends after {size} bytes" in err
    assert "Copy or write it again" in err and "3 problem(s)" in err


def test_nonfinite_voxels_are_refused_or_set_to_0_when_allowed(session_env, inputs, output, capsys):
    """NaN and inf, which SimpleITK's NIfTI reader silently reads as 0: counted and refused; --allow_nonfinite
    sets them to 0 and says so."""
    bad = inputs / f"{CASES[0]}_0001.nii.gz"

    def spoil(a):
        a[2:4, 10:20, 10:20] = np.nan
        a[0, 0, :3] = np.inf
        return a
    rewrite(bad, spoil)
    for f in inputs.glob(f"{CASES[1]}_*"):
        f.unlink()
    for f in inputs.glob(f"{CASES[2]}_*"):
        f.unlink()
    err = refused(inputs, output, capsys)
    assert f"{bad} holds 203 non-finite voxel(s) (NaN or inf)" in err and "--allow_nonfinite" in err
    code, out, err = predict(inputs, output, "--allow_nonfinite", capsys=capsys)
    assert code == 0, err
    assert f"{bad}: 203 non-finite voxel(s) (NaN or inf) set to 0 (--allow_nonfinite)" in out
    seg = sitk.ReadImage(str(output / f"{CASES[0]}.nii.gz"))
    assert seg.GetSize() == sitk.ReadImage(str(bad)).GetSize()
    assert (output / "earlier_case.nii.gz").read_bytes() == b"an earlier prediction"


def test_channels_on_another_grid_are_named(session_env, inputs, output, capsys):
    """A channel of another size (stock predict fails in a worker, mid-log) and one with another origin."""
    resized = inputs / f"{CASES[0]}_0001.nii.gz"
    image = sitk.ReadImage(str(resized))
    sitk.WriteImage(sitk.Resample(image, [s + 4 for s in image.GetSize()], sitk.Transform(), sitk.sitkLinear,
                                  image.GetOrigin(), image.GetSpacing(), image.GetDirection()), str(resized))
    moved = inputs / f"{CASES[2]}_0002.nii.gz"
    image = sitk.ReadImage(str(moved))
    image.SetOrigin([o + 5 for o in image.GetOrigin()])
    sitk.WriteImage(image, str(moved))
    err = refused(inputs, output, capsys)
    assert f"{resized} is not on the grid of {CASES[0]}_0000.nii.gz" in err and "shape (28, 44, 44) instead of " \
                                                                              "(24, 40, 40)" in err
    assert f"{moved} is not on the grid of {CASES[2]}_0000.nii.gz" in err and "origin" in err
    assert "resample it onto that file's grid" in err


def test_a_text_file_named_nii_gz(session_env, inputs, output, capsys):
    text = inputs / f"{CASES[1]}_0002.nii.gz"
    text.write_text("not an image\n")
    err = refused(inputs, output, capsys)
    assert f"{text} cannot be read as an image by nnU-Net's SimpleITKIO" in err
    assert "b'not an image\\n'" in err and "not gzip-compressed" in err and "Replace it" in err


def test_parallel_checks_find_what_the_in_process_ones_find(tiny_dataset, tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from moe_nnunet.workflow.integrity import PARALLEL_FROM_CASES, check_cases

    cases = [sorted(str(f) for f in (tiny_dataset / "imagesTr").glob(f"TinyPhantom_{i:03d}_*"))
             for i in range(PARALLEL_FROM_CASES)]
    cut = tmp_path / Path(cases[3][1]).name
    cut.write_bytes(gzip.compress(b"x" * 5000)[:-6])
    cases[3][1] = str(cut)
    serial, parallel = check_cases(cases, SimpleITKIO, 0), check_cases(cases, SimpleITKIO, 2)
    assert serial[1] == parallel[1] and len(serial[1]) == 1 and "is truncated" in serial[1][0]
    assert serial[0][cases[0][0]].geometry == parallel[0][cases[0][0]].geometry


# ------------------------------------------------------------------------------------------------ predict: outputs


def test_existing_predictions_are_refused_replaced_or_continued(session_env, inputs, output, capsys):
    """An earlier prediction of a case: listed and kept; --continue_prediction predicts an unreadable one again
    and skips a complete one; --overwrite replaces it. Every prediction is renamed into place when complete."""
    for case in CASES[1:]:
        for f in inputs.glob(f"{case}_*"):
            f.unlink()
    earlier = output / f"{CASES[0]}.nii.gz"
    earlier.write_bytes(b"an earlier prediction")
    err = refused(inputs, output, capsys)
    assert f"{output} already holds predictions" in err and f"  {earlier}" in err and "--overwrite" in err
    (output / ".moe_nnunet_partial-TinyPhantom_000.nii.gz").write_bytes(b"")  # a stopped run's half-written file

    code, out, err = predict(inputs, output, "--continue_prediction", capsys=capsys)
    assert code == 0, err
    assert f"{earlier} cannot be read as an image" in out and f"predicting {CASES[0]} again" in out
    assert not list(output.glob(".moe_nnunet_partial-*"))
    first = earlier.read_bytes()
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(earlier)))
    assert segmentation.shape == (24, 40, 40)

    code, out, err = predict(inputs, output, "--continue_prediction", capsys=capsys)
    assert code == 0 and "1 case(s) already predicted" in out and earlier.read_bytes() == first
    earlier.write_bytes(b"")
    code, out, err = predict(inputs, output, "--overwrite", capsys=capsys)
    assert code == 0, err
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(earlier))), segmentation)
    assert (output / "earlier_case.nii.gz").read_bytes() == b"an earlier prediction"


def test_an_interrupted_export_leaves_no_file_under_the_predictions_name(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from moe_nnunet.evaluation.predict import PARTIAL_PREFIX, atomic_writer

    props = {"sitk_stuff": {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0),
                            "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}, "spacing": [2.0, 1.0, 1.0]}
    seg = np.ones((4, 5, 6), np.uint8)
    (tmp_path / f"{PARTIAL_PREFIX}case.npz").write_bytes(b"probabilities")
    atomic_writer(SimpleITKIO)().write_seg(seg, str(tmp_path / f"{PARTIAL_PREFIX}case.nii.gz"), props)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "case.npz"]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.nii.gz"))).sum() == seg.sum()

    class Crashes(SimpleITKIO):
        def write_seg(self, seg, output_fname, properties):
            Path(output_fname).write_bytes(b"")
            raise MemoryError("killed while writing")
    with pytest.raises(MemoryError):
        atomic_writer(Crashes)().write_seg(seg, str(tmp_path / f"{PARTIAL_PREFIX}other.nii.gz"), props)
    assert not (tmp_path / "other.nii.gz").exists()


# ------------------------------------------------------------------------------------------------ merge, plan, combine


def test_merge_never_writes_nnunets_plans_and_keeps_existing_plans(session_env, trained, planned, capsys):
    files = [planned / "nnUNetPlans.json", planned / f"{PLANS}.json"]
    before = [f.read_bytes() for f in files]
    for plans, extra in (("nnUNetPlans", ["--overwrite"]), (PLANS, [])):
        code = main(["merge", "-d", str(TINY_ID), "-m", str(trained), "-o", plans, *extra])
        err = capsys.readouterr().err
        assert code == 1, err
        assert str(planned / f"{plans}.json") in err
        assert ("even with --overwrite" if extra else "pass --overwrite to replace it") in err
    assert [f.read_bytes() for f in files] == before


def copy_dataset(tiny_dataset: Path, raw: Path, dataset_id: int) -> Path:
    """Three cases of the tiny dataset as dataset `dataset_id` in `raw`."""
    folder = raw / f"Dataset{dataset_id}_Broken"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in CASES:
        for f in (tiny_dataset / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, folder / "imagesTr" / f.name)
        shutil.copy(tiny_dataset / "labelsTr" / f"{case}.nii.gz", folder / "labelsTr")
    dataset_json = json.loads((tiny_dataset / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": len(CASES)}))
    return folder


@pytest.fixture
def own_env(tmp_path, monkeypatch) -> NNUNetEnv:
    env = NNUNetEnv(tmp_path / "nnunet")
    in_env(monkeypatch, env)
    return env


def plan_refused(env: NNUNetEnv, dataset_id: int, capsys, *extra: str) -> str:
    before = digest(env.raw)
    assert main(["plan", "-d", str(dataset_id), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moe_nnunet plan: error:")
    assert digest(env.raw) == before and not list(env.preprocessed.iterdir())
    return err


def test_plan_names_a_missing_and_an_extra_channel(own_env, tiny_dataset, capsys):
    folder = copy_dataset(tiny_dataset, own_env.raw, 981)
    missing = folder / "imagesTr" / f"{CASES[1]}_0001.nii.gz"
    missing.unlink()
    extra = folder / "imagesTr" / f"{CASES[2]}_0003.nii.gz"
    shutil.copy(folder / "imagesTr" / f"{CASES[2]}_0000.nii.gz", extra)
    err = plan_refused(own_env, 981, capsys)
    assert f"{missing} is missing: case {CASES[1]} has no channel 0001 (T2); add the file, or remove the case" in err
    assert f"{extra}: channel 0003 does not exist for {folder.name}" in err and "remove or rename the file" in err


def test_plan_names_an_undeclared_label_value(own_env, tiny_dataset, capsys):
    folder = copy_dataset(tiny_dataset, own_env.raw, 982)
    label = folder / "labelsTr" / f"{CASES[1]}.nii.gz"

    def undeclared(a):
        a[0, 0, 0] = 7
        return a
    rewrite(label, undeclared)
    err = plan_refused(own_env, 982, capsys)
    assert f"{label} holds label value(s) [7] that dataset.json's 'labels' does not declare" in err
    assert "--no_verify skips" in err


def test_plan_never_writes_nnunets_plans_and_keeps_existing_plans(own_env, tiny_dataset, capsys):
    copy_dataset(tiny_dataset, own_env.raw, 983)
    plans = own_env.preprocessed / "Dataset983_Broken" / "nnUNetM4oEPlans.json"
    plans.parent.mkdir()
    plans.write_text("{}")
    assert main(["plan", "-d", "983", "-overwrite_plans_name", "nnUNetPlans", "--overwrite"]) == 1
    assert "nnU-Net's own plans; moe_nnunet never writes it, even with --overwrite" in capsys.readouterr().err
    assert main(["plan", "-d", "983"]) == 1
    assert f"{plans} already exists and nothing was written; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in plans.parent.iterdir()] == [plans.name] and plans.read_text() == "{}"


def test_combine_replaces_an_existing_dataset_only_with_overwrite(tmp_path, monkeypatch, capsys):
    from test_combine import LESION, synthetic

    for var in NNUNET_VARS:
        monkeypatch.delenv(var, raising=False)
    synthetic(tmp_path, 1, "LungCT", ["CT"], LESION)
    synthetic(tmp_path, 2, "BrainMRI", ["MRI"], LESION)
    combine = ["combine", "-d", "1", "2", "-o", "4", "--name", "Lesion", "--raw", str(tmp_path)]
    assert main(combine) == 0
    (tmp_path / "Dataset004_Lesion" / "note.txt").write_text("made by hand")
    before = digest(tmp_path / "Dataset004_Lesion")
    capsys.readouterr()
    assert main(combine) == 1
    assert "already exists" in capsys.readouterr().err and digest(tmp_path / "Dataset004_Lesion") == before
    assert main(["combine", "-d", "1", "4", "-o", "4", "--name", "Lesion", "--raw", str(tmp_path), "--overwrite"]) == 1
    assert "is one of the datasets to combine" in capsys.readouterr().err
    assert main(combine + ["--overwrite"]) == 0
    assert not (tmp_path / "Dataset004_Lesion" / "note.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_LungCT", "Dataset002_BrainMRI",
                                                          "Dataset004_Lesion"]
