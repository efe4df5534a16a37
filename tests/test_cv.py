"""`moe_nnunet cv` pieces and atomic checkpoints, without training: fold states, SLURM scripts, model lists."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from moe_nnunet.trainers.checkpointing import AtomicCheckpoints, UnreadableCheckpointError, load_checkpoint_file
from moe_nnunet.workflow import cv


def test_fold_status_follows_the_files_nnunet_writes(tmp_path):
    assert cv.fold_status(tmp_path / "fold_0") == "train"
    fold = tmp_path / "fold_1"
    fold.mkdir()
    (fold / "checkpoint_best.pth").touch()
    assert cv.fold_status(fold) == "resume"
    (fold / "checkpoint_latest.pth").touch()
    assert cv.fold_status(fold) == "resume"
    (fold / "checkpoint_final.pth").touch()
    assert cv.fold_status(fold) == "validate"
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").touch()
    assert cv.fold_status(fold) == "validate"  # find_best_configuration needs the .npz files too
    (fold / "validation" / "case_0.npz").touch()
    assert cv.fold_status(fold) == "done"
    run = cv.FoldRun("990", "3d_fullres", "1", "T", "P")
    assert cv.train_command(run, "resume", "cpu")[-2:] == ["--npz", "--c"]
    assert cv.train_command(run, "validate", "cpu")[-2:] == ["--npz", "--val"]


def test_other_models_for_the_best_configuration():
    models = cv.best_models(["2d", "3d_fullres"], "nnUNetTrainerM4oE", "nnUNetM4oEPlans",
                            ["nnUNetTrainer:nnUNetPlans", "nnUNetTrainer:nnUNetResEncUNetMPlans:3d_fullres"])
    assert len(models) == 5
    assert {"trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "configuration": "2d"} in models
    assert models[-1] == {"trainer": "nnUNetTrainer", "plans": "nnUNetResEncUNetMPlans",
                          "configuration": "3d_fullres"}
    with pytest.raises(ValueError, match="TRAINER:PLANS"):
        cv.best_models(["3d_fullres"], "a", "b", ["nnUNetTrainer"])


def test_slurm_scripts_run_one_fold_per_task_then_find_best(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", "/data/results with space")
    runs = [cv.FoldRun("Dataset990_TinyPhantom", c, f, "nnUNetTrainerM4oE", "nnUNetM4oEPlans")
            for c in ("2d", "3d_fullres") for f in "01234"]
    common = ["-d", "Dataset990_TinyPhantom", "-tr", "nnUNetTrainerM4oE", "-p", "nnUNetM4oEPlans", "-device", "cuda"]
    array, best = cv.write_slurm_scripts(runs, common, tmp_path, ["--partition=gpu", "--gres=gpu:1"],
                                         ["-num_gpus", "1"], ["-c", "2d", "3d_fullres", "--folds", *"01234"])
    text = array.read_text()
    assert "#SBATCH --array=0-9" in text and "#SBATCH --partition=gpu" in text and "#SBATCH --gres=gpu:1" in text
    assert "CONFIGURATIONS=(2d 2d 2d 2d 2d 3d_fullres 3d_fullres 3d_fullres 3d_fullres 3d_fullres)" in text
    assert "FOLDS=(0 1 2 3 4 0 1 2 3 4)" in text and "--train_args -num_gpus 1" in text
    assert "export nnUNet_results='/data/results with space'" in text
    assert "--best_only" in best.read_text() and "--folds 0 1 2 3 4" in best.read_text()
    for script in (array, best):
        subprocess.run(["bash", "-n", str(script)], check=True)
    # the array task's command parses as `moe_nnunet cv` arguments
    from moe_nnunet.cli import build_parser
    line = text.split("exec ", 1)[1].replace("\\\n", " ")
    args = build_parser().parse_args(line.replace('"${CONFIGURATIONS[$SLURM_ARRAY_TASK_ID]}"', "2d")
                                     .replace('"${FOLDS[$SLURM_ARRAY_TASK_ID]}"', "3").split()[1:])
    assert (args.c, args.folds, args.no_best, args.train_args) == (["2d"], ["3"], True, ["-num_gpus", "1"])


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="SLURM's sbatch is not installed")
def test_sbatch_accepts_the_scripts(tmp_path):
    runs = [cv.FoldRun("Dataset990_TinyPhantom", "3d_fullres", f, "T", "P") for f in "01"]
    array, best = cv.write_slurm_scripts(runs, ["-d", "Dataset990_TinyPhantom"], tmp_path, [], (), ["--folds", "0", "1"])
    try:
        verdicts = cv.submit_slurm(array, best, test_only=True)
    except RuntimeError as e:
        pytest.skip(f"no SLURM controller answers: {e}")
    assert len(verdicts) == 2 and all("to start at" in v for v in verdicts)


class _Saver:
    """Stands in for nnU-Net's trainer: its save_checkpoint writes half a file and dies when told to."""
    local_rank, device = 0, torch.device("cpu")

    def __init__(self):
        self.die = False
        self.loaded = None

    def save_checkpoint(self, filename):
        if self.die:
            with open(filename, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed during the save")
        torch.save({"network_weights": {"w": torch.ones(2)}, "current_epoch": 3}, filename)

    def load_checkpoint(self, checkpoint):
        self.loaded = checkpoint


class _Trainer(AtomicCheckpoints, _Saver):
    pass


def test_a_save_killed_midway_leaves_the_previous_checkpoint_readable(tmp_path):
    trainer, path = _Trainer(), tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    trainer.die = True
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(path))
    assert load_checkpoint_file(path)["current_epoch"] == 3
    trainer.die = False
    trainer.save_checkpoint(str(path))  # the next save clears the leftover partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]


def test_a_damaged_checkpoint_is_named_with_the_way_out(tmp_path):
    trainer = _Trainer()
    (tmp_path / "checkpoint_best.pth").write_bytes(b"")
    latest = tmp_path / "checkpoint_latest.pth"
    latest.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnreadableCheckpointError, match="checkpoint_latest.pth cannot be read") as e:
        trainer.load_checkpoint(str(latest))
    assert "continues from checkpoint_best.pth" in str(e.value)
