"""The whole nnU-Net workflow with an M4oE trainer, through the stock programs, on CPU.

Kill-and-resume of fold 1 (SIGKILL, then `nnUNetv2_train --c`; `--val --val_best` on a copy) -> a 2-fold
cross-validation with `moe_nnunet cv` (the finished folds skipped, the missing ones trained) beside nnU-Net's own
network -> the best configuration, ensembling the two -> `nnUNetv2_predict` with the 2-fold ensemble,
`nnUNetv2_ensemble`, `nnUNetv2_apply_postprocessing` -> `nnUNetv2_export_model_to_zip` and
`nnUNetv2_install_pretrained_model_from_zip` into an empty results folder -> identical predictions; then the
same folds through a SLURM job array when a SLURM controller answers. Two folds exercise everything five would
(fold loop, skipping, resuming, ensembling across folds and models) at two fifths of the training.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BASELINE, BIN, PLANS, TINY_ID, TRAINER

D = str(TINY_ID)
FOLDS = ["0", "1"]  # fold 0: the session's `trained` model; fold 1: the killed and resumed run
KILLED = "1"
PREDICT_FLAGS = ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
# moe_nnunet predict's refusals: checked before any prediction, in the command's own process
REFUSAL_FLAGS = ["-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"]


def model_folder(env, trainer: str = TRAINER, plans: str = PLANS) -> Path:
    return env.results / f"Dataset{D}_TinyPhantom" / f"{trainer}__{plans}__3d_fullres"


def epochs_in(log: Path) -> list[int]:
    """The epochs a training log reports starting (nnU-Net writes a line 'Epoch N' per epoch)."""
    lines = [line.split(": ", 1)[-1].strip() for line in log.read_text().splitlines()]
    return [int(line.split()[1]) for line in lines if line.startswith("Epoch ") and line.split()[1].isdigit()]


@pytest.fixture(scope="module")
def workflow_env(nnunet_env, trained, baseline_trained, tmp_path_factory):
    """This module's own results folder, holding copies of the session's fold-0 models: the module adds folds,
    cross-validation results and ensembles to them, which other test files never see."""
    return nnunet_env.with_results(tmp_path_factory.mktemp("workflow") / "results", trained, baseline_trained)


@pytest.fixture(scope="module")
def resumed(workflow_env, planned):
    """Fold 1, killed with SIGKILL once its first checkpoint_latest.pth exists, then resumed with --c (--npz: the
    cross-validation below then finds it done)."""
    fold = model_folder(workflow_env) / f"fold_{KILLED}"
    cmd = [str(BIN / "nnUNetv2_train"), D, "3d_fullres", KILLED, "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
           "--npz"]
    proc = subprocess.Popen(cmd, env={**workflow_env.env, "nnUNet_n_proc_DA": "0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (fold / "checkpoint_latest.pth").is_file():
        assert proc.poll() is None, "the training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {"final_written": (fold / "checkpoint_final.pth").is_file(),
              "latest_epoch": torch.load(fold / "checkpoint_latest.pth", weights_only=False)["current_epoch"],
              "logs": sorted(fold.glob("training_log_*.txt"))}
    time.sleep(1.1)  # nnU-Net names its logs by the second
    workflow_env.run("nnUNetv2_train", D, "3d_fullres", KILLED, "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--c",
                   "--npz")
    return fold, killed


def test_killed_training_resumes_where_it_stopped(resumed):
    fold, killed = resumed
    assert not killed["final_written"] and killed["latest_epoch"] == 1
    assert not list(fold.glob("*.partial"))
    new_logs = sorted(set(fold.glob("training_log_*.txt")) - set(killed["logs"]))
    assert len(new_logs) == 1 and epochs_in(new_logs[0]) == [1]  # epoch 0 was not trained again
    assert "mixture weight (expert curriculum): 1.000" in new_logs[0].read_text()  # the curriculum's phase
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    # AdamW's step count carried over the kill: 2 epochs of 4 iterations, not 1 (parameters that got no
    # gradient in some steps, e.g. the experts' heads after the curriculum, have fewer)
    assert max(int(s["step"]) for s in final["optimizer_state"]["state"].values()) == 8
    gate_history = final["logging"]["moe_gate_weights"]
    assert len(gate_history) == 2 and all(g and g["mean"] for g in gate_history)
    assert (fold / "validation" / "summary.json").is_file() and list((fold / "validation").glob("*.npz"))


def test_val_best_validates_the_best_checkpoint(workflow_env, resumed, tmp_path):
    """On a copy of the resumed fold whose checkpoint_best.pth is marked (its output layers' bias made to say
    label 1 at every voxel): `--val --val_best` validates with that checkpoint, not checkpoint_final.pth."""
    fold, _ = resumed
    copy = tmp_path / "results" / fold.parent.parent.name / fold.parent.name
    copy.mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(fold.parent / name, copy / name)
    (copy / fold.name).mkdir()
    shutil.copy(fold / "checkpoint_final.pth", copy / fold.name / "checkpoint_final.pth")
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    heads = [k for k in best["network_weights"] if k.startswith("decoder.seg_layers.") and k.endswith(".bias")]
    assert heads, sorted(best["network_weights"])[-5:]
    for k in heads:
        best["network_weights"][k] = torch.tensor([0.0, 100.0, 0.0, 0.0, 0.0])
    torch.save(best, copy / fold.name / "checkpoint_best.pth")
    env = dict(workflow_env.env, nnUNet_results=str(tmp_path / "results"), nnUNet_n_proc_DA="0")
    out = subprocess.run([str(BIN / "nnUNetv2_train"), D, "3d_fullres", KILLED, "-tr", TRAINER, "-p", PLANS,
                          "-device", "cpu", "--val", "--val_best", "--npz"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    validation = copy / fold.name / "validation"
    cases = json.loads((validation / "summary.json").read_text())["metric_per_case"]
    assert len(cases) == 2 and len(list(validation.glob("*.npz"))) == 2
    for c in cases:  # every voxel label 1, with certainty: the marked checkpoint's output
        prediction = Path(c["prediction_file"])
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))).tolist()) == {1}
        probabilities = np.load(validation / prediction.name.replace(".nii.gz", ".npz"))["probabilities"]
        assert probabilities[1].min() > 0.99, prediction.name
        # the resumed run's own validation of this case, from checkpoint_final.pth, is not that
        final = np.load(fold / "validation" / prediction.name.replace(".nii.gz", ".npz"))["probabilities"]
        assert final[1].min() < 0.5, prediction.name


@pytest.fixture(scope="module")
def cross_validated(workflow_env, resumed) -> dict[str, str]:
    """`moe_nnunet cv` over folds 0 and 1: nnU-Net's network has fold 0 (`baseline_trained`) and gets fold 1
    trained; M4oE has both (`trained`, the resumed run) and only the best-configuration step is left."""
    cv = ["moe_nnunet", "cv", "-d", D, "--folds", *FOLDS, "-device", "cpu"]
    baseline = workflow_env.run(*cv, "-tr", BASELINE, "-p", "nnUNetPlans", "--no_best").stdout
    m4oe = workflow_env.run(*cv, "-tr", TRAINER, "-p", PLANS, "--with", f"{BASELINE}:nnUNetPlans").stdout
    return {"baseline": baseline, "m4oe": m4oe}


def test_cv_trains_the_missing_folds_and_finds_the_best_configuration(workflow_env, cross_validated):
    baseline, m4oe = cross_validated["baseline"], cross_validated["m4oe"]
    assert "3d_fullres fold 0: done" in baseline and "3d_fullres fold 1: train" in baseline
    assert "3d_fullres fold 0: done" in m4oe and "3d_fullres fold 1: done" in m4oe and ": train" not in m4oe
    assert "best configuration of" in m4oe and "best configuration of" not in baseline  # --no_best
    for trainer, plans in ((TRAINER, PLANS), (BASELINE, "nnUNetPlans")):
        folder = model_folder(workflow_env, trainer, plans)
        for f in FOLDS:
            assert (folder / f"fold_{f}" / "checkpoint_final.pth").is_file()
            assert list((folder / f"fold_{f}" / "validation").glob("*.npz"))
        cv_summary = json.loads((folder / "crossval_results_folds_0_1" / "summary.json").read_text())
        assert set(cv_summary["mean"]) == {"1", "2", "3", "4"}
        # the cross-validation covers both folds' held-out cases: 2 + 2 of the 10
        assert len(cv_summary["metric_per_case"]) == 4
    dataset_results = model_folder(workflow_env).parent
    info = json.loads((dataset_results / "inference_information.json").read_text())
    assert {m["trainer"] for m in info["considered_models"]} == {TRAINER, BASELINE}
    ensemble = f"ensemble___{TRAINER}__{PLANS}__3d_fullres___{BASELINE}__nnUNetPlans__3d_fullres___0_1"
    assert ensemble in info["all_results"] and len(info["all_results"]) == 3
    assert "nnUNetv2_predict" in (dataset_results / "inference_instructions.txt").read_text()


@pytest.fixture(scope="module")
def test_images(tiny_dataset, tmp_path_factory) -> Path:
    images = tiny_dataset / "imagesTr"
    folder = tmp_path_factory.mktemp("test_images")
    for f in sorted(images.glob("*.nii.gz"))[:6]:  # 2 cases x 3 channels
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def ensemble_predictions(workflow_env, cross_validated, test_images, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("predictions")
    folders = {name: out / name for name in ("m4oe", "baseline", "ensemble", "postprocessed")}
    for name, trainer, plans in (("m4oe", TRAINER, PLANS), ("baseline", BASELINE, "nnUNetPlans")):
        workflow_env.run("nnUNetv2_predict", "-i", str(test_images), "-o", str(folders[name]), "-d", D, "-c",
                       "3d_fullres", "-f", *FOLDS, "-tr", trainer, "-p", plans, "--save_probabilities",
                       *PREDICT_FLAGS)
    workflow_env.run("nnUNetv2_ensemble", "-i", str(folders["m4oe"]), str(folders["baseline"]), "-o",
                   str(folders["ensemble"]), "-np", "1")
    info = json.loads((model_folder(workflow_env).parent / "inference_information.json").read_text())
    best = info["best_model_or_ensemble"]
    workflow_env.run("nnUNetv2_apply_postprocessing", "-i", str(folders["ensemble"]), "-o",
                   str(folders["postprocessed"]), "-pp_pkl_file", best["postprocessing_file"], "-np", "1",
                   "-plans_json", best["some_plans_file"])
    return folders


def test_ensemble_predictions_are_valid_segmentations(ensemble_predictions, test_images):
    cases = sorted({p.name[:-len("_0000.nii.gz")] for p in test_images.glob("*_0000.nii.gz")})
    for name in ("m4oe", "ensemble", "postprocessed"):
        for case in cases:
            seg = sitk.ReadImage(str(ensemble_predictions[name] / f"{case}.nii.gz"))
            ref = sitk.ReadImage(str(test_images / f"{case}_0000.nii.gz"))
            assert seg.GetSize() == ref.GetSize()
            assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1, 2, 3, 4}
    assert list(ensemble_predictions["m4oe"].glob("*.npz"))


def test_exported_model_predicts_identically_after_install(workflow_env, ensemble_predictions, test_images,
                                                          tmp_path):
    archive = tmp_path / "m4oe.zip"
    workflow_env.run("nnUNetv2_export_model_to_zip", "-d", D, "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS,
                   "-f", *FOLDS, "-o", str(archive))
    elsewhere = tmp_path / "empty_results"
    elsewhere.mkdir()
    env = dict(workflow_env.env, nnUNet_results=str(elsewhere))
    subprocess.run([str(BIN / "nnUNetv2_install_pretrained_model_from_zip"), str(archive)], env=env, check=True,
                   capture_output=True)
    out = tmp_path / "installed"
    subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(test_images), "-o", str(out), "-d", D, "-c",
                    "3d_fullres", "-f", *FOLDS, "-tr", TRAINER, "-p", PLANS, *PREDICT_FLAGS], env=env, check=True,
                   capture_output=True)
    for original in ensemble_predictions["m4oe"].glob("*.nii.gz"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(original)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / original.name)))
        assert np.array_equal(a, b), original.name


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.skipif(not _slurm_answers(), reason="no SLURM controller answers here (CI starts one with "
                                                 "scripts/slurm_localhost.sh)")
def test_slurm_array_then_dependent_best_configuration(workflow_env, cross_validated, tmp_path):
    """The same cross-validation submitted to SLURM: every task finds its fold done, then the dependent job
    picks the best configuration again."""
    info = model_folder(workflow_env).parent / "inference_information.json"
    info.unlink()
    out = workflow_env.run("moe_nnunet", "cv", "-d", D, "--folds", *FOLDS, "-tr", TRAINER, "-p", PLANS, "-device",
                         "cpu", "--with", f"{BASELINE}:nnUNetPlans", "--launcher", "slurm", "--script_dir",
                         str(tmp_path)).stdout
    words = out.split()
    array_id, best_id = words[words.index("array") + 2], words[words.index("then") + 2]
    deadline = time.time() + 600
    while subprocess.run(["squeue", "-h", "-j", f"{array_id},{best_id}"], capture_output=True,
                         text=True).stdout.strip():
        assert time.time() < deadline, "the SLURM jobs did not finish in 10 minutes"
        time.sleep(1)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    task_logs = [text for name, text in logs.items() if "_best_" not in name]
    assert len(task_logs) == len(FOLDS) and all(": done (" in text for text in task_logs)
    best_log = next(text for name, text in logs.items() if "_best_" in name)
    assert "best configuration of" in best_log and info.is_file(), best_log[-3000:]


# bad input: a clear error naming what is wrong and the fix, and nothing already written is touched

@pytest.fixture
def one_fold_copy(nnunet_env, trained, tmp_path):
    """A results folder holding the model with fold 0 only, and an output folder with an earlier prediction."""
    results = tmp_path / "results"
    copy = results / trained.parent.name / trained.name
    (copy / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(trained / name, copy / name)
    shutil.copy(trained / "fold_0" / "checkpoint_final.pth", copy / "fold_0" / "checkpoint_final.pth")
    output = tmp_path / "output"
    output.mkdir()
    (output / "earlier_case.nii.gz").write_bytes(b"an earlier prediction")
    env = dict(nnunet_env.env, nnUNet_results=str(results))
    return copy, output, env


def _run(env, *cmd):
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True, timeout=600)


def _untouched(output: Path) -> bool:
    return (output / "earlier_case.nii.gz").read_bytes() == b"an earlier prediction"


def test_predict_names_the_missing_fold_and_the_trained_ones(one_fold_copy, test_images):
    _, output, env = one_fold_copy
    out = _run(env, "moe_nnunet", "predict", "-i", str(test_images), "-o", str(output), "-d", D, "-c", "3d_fullres",
               "-tr", TRAINER, "-p", PLANS, *REFUSAL_FLAGS)
    assert out.returncode == 1
    assert "fold 1 of" in out.stderr and "has no checkpoint_final.pth" in out.stderr and "-f 0." in out.stderr
    assert _untouched(output) and len(list(output.iterdir())) == 1


def test_predict_with_unknown_plans_lists_the_trained_models(one_fold_copy, test_images):
    copy, output, env = one_fold_copy
    out = _run(env, "moe_nnunet", "predict", "-i", str(test_images), "-o", str(output), "-d", D, "-c", "3d_fullres",
               "-tr", TRAINER, "-p", "NoSuchPlans", "-f", "0", *REFUSAL_FLAGS)
    assert out.returncode == 1 and "-p NoSuchPlans" in out.stderr and copy.name in out.stderr
    assert _untouched(output)


def test_a_corrupted_checkpoint_is_named_in_predict_and_resume(one_fold_copy, test_images):
    copy, output, env = one_fold_copy
    checkpoint = copy / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # truncated
    out = _run(env, "moe_nnunet", "predict", "-i", str(test_images), "-o", str(output), "-d", D, "-c", "3d_fullres",
               "-tr", TRAINER, "-p", PLANS, "-f", "0", *REFUSAL_FLAGS)
    assert out.returncode == 1 and f"{checkpoint} cannot be read" in out.stderr and "truncated" in out.stderr
    assert _untouched(output)
    checkpoint.rename(copy / "fold_0" / "checkpoint_latest.pth")
    out = _run(env, "nnUNetv2_train", D, "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--c")
    assert out.returncode != 0 and "checkpoint_latest.pth cannot be read" in out.stderr
    assert "train this fold again" in out.stderr


def test_images_with_the_wrong_number_of_channels(one_fold_copy, test_images, tmp_path):
    _, output, env = one_fold_copy
    two = tmp_path / "two_channels"
    two.mkdir()
    for f in test_images.glob("*_000[01].nii.gz"):
        shutil.copy(f, two / f.name)
    # stock nnUNetv2_predict: the network says what it reads and what to do
    out = _run(env, "nnUNetv2_predict", "-i", str(two), "-o", str(output), "-d", D, "-c", "3d_fullres", "-f", "0",
               "-tr", TRAINER, "-p", PLANS, *PREDICT_FLAGS)
    assert out.returncode != 0 and "reads 3 input channels" in out.stderr and "got 2" in out.stderr
    assert _untouched(output)
    # one channel too many: moe_nnunet predict names the file
    four = tmp_path / "four_channels"
    shutil.copytree(test_images, four)
    extra = next(four.glob("*_0000.nii.gz"))
    shutil.copy(extra, four / extra.name.replace("_0000", "_0003"))
    out = _run(env, "moe_nnunet", "predict", "-i", str(four), "-o", str(output), "-d", D, "-c", "3d_fullres",
               "-tr", TRAINER, "-p", PLANS, "-f", "0", *REFUSAL_FLAGS)
    assert out.returncode == 1 and extra.name.replace("_0000", "_0003") in out.stderr
    assert "remove or rename the file" in out.stderr and _untouched(output)
