"""`moe_nnunet compare` end to end on a tiny schedule (nnU-Net and M4oE chosen with --models, every modality
removed, the plateau verdicts, resuming), and its plateau rule on synthetic curves. The other rows' trainers are
nnU-Net's and M4oE's with another dropout probability or plans (tests/test_modalities.py trains channel dropout)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_nnunet.datasets.brats_phantom import CHANNELS, LABELS, build_brats_phantom
from moe_nnunet.commands.compare import MODEL_KEYS
from moe_nnunet.evaluation.compare import MODELS, plateau_verdict
from conftest import THREAD_ENV

BIN = Path(sys.executable).parent


def test_plateau_rule_on_synthetic_curves():
    rng = np.random.default_rng(0)
    epochs = np.arange(40)
    flat = 0.8 * (1 - np.exp(-epochs / 4)) + rng.normal(0, 0.01, 40)      # converged by epoch ~20, noisy
    rising = 0.02 * epochs + rng.normal(0, 0.01, 40)                        # still 2 points per epoch
    slow = 0.8 * (1 - np.exp(-epochs / 25))                                 # still 1.5 points per quarter
    assert plateau_verdict(flat)["plateaued"] is True
    verdict = plateau_verdict(rising)
    assert verdict["plateaued"] is False and verdict["rise"] == pytest.approx(0.2, abs=0.02)
    assert plateau_verdict(slow)["plateaued"] is False
    assert plateau_verdict([0.1, 0.5, 0.6])["plateaued"] is None            # too short to tell
    assert "25 %" in verdict["rule"]


def _compare(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, nnUNet_def_n_proc="1", **THREAD_ENV)
    proc = subprocess.run([str(BIN / "moe_nnunet"), "compare", "-d", "brats_phantom", "-o", str(out),
                           "--iterations", "4", "--epoch_iterations", "2", "--val_iterations", "1",
                           "--max_features", "16", "--batch_size", "4", "--models", "nnunet", "m4oe"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The command on a tiny phantom, 2 epochs of 2 iterations for nnU-Net and M4oE."""
    out = tmp_path_factory.mktemp("compare")
    # a tiny phantom where the command would build the default one (it reuses a built dataset)
    build_brats_phantom(out / "nnUNet_raw", 908, num_cases=10, shape=(3, 40, 40), spacing=(4.0, 3.0, 3.0))
    return out, _compare(out)


def test_compare_trains_the_chosen_models_and_tables_every_modality_removed(compared):
    out, proc = compared
    assert list(MODEL_KEYS.values()) == [m for m, _, _ in MODELS]  # a --models key for every row
    chosen = [MODELS[0], MODELS[2]]
    report = json.loads((out / "comparison.json").read_text())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["schedule"] == {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                                  "iterations": 4}
    assert list(report["models"]) == [m for m, _, _ in chosen]
    assert set(report["robustness"]["results"]) == {t for _, t, _ in chosen}
    conditions = ["full input"] + [f"without {c}" for c in CHANNELS]
    for model, trainer, plans in chosen:
        m = report["models"][model]
        assert m["epochs"] == 2 and len(report["curves"][model]["mean_fg_dice"]) == 2
        assert m["plateau"]["plateaued"] is None and f"{model}: too short to tell" in proc.stdout
        assert m["seconds_per_iteration"] > 0 and m["parameters"] > 0
        results = report["robustness"]["results"][trainer]
        assert list(results) == conditions
        assert all(set(r["labels"]) == set(LABELS) - {"background"} for r in results.values())
    # one narrowed network for both nnU-Net rows, one expert over all channels in the sanity row; nnU-Net's own
    # plans are left as they were planned
    preprocessed = out / "nnUNet_preprocessed" / report["dataset"]
    plans = {p: json.loads((preprocessed / f"{p}.json").read_text())["configurations"]["2d"]
             for p in ("nnUNetPlans", "nnUNetPlans_compare", "nnUNetM4oEPlans_compare1Expert")}
    assert max(plans["nnUNetPlans_compare"]["architecture"]["arch_kwargs"]["features_per_stage"]) == 16
    assert plans["nnUNetM4oEPlans_compare1Expert"]["architecture"]["arch_kwargs"]["expert_channels"] == [[0, 1, 2, 3]]
    assert "moe_nnunet_compare_schedule" not in plans["nnUNetPlans"]

    table = (out / "comparison.md").read_text()
    for model, trainer, _ in chosen:
        assert f"| {model} | `{trainer}`" in table
    assert table.count("too short to tell") == len(chosen) and MODELS[1][0] not in table
    for condition in conditions:
        assert f"| {condition} | **mean** |" in table                  # per-label rows
    assert "| model | " + " | ".join(conditions) + " |" in table      # mean Dice per condition
    assert "Sanity" not in table and report["sanity"] is None  # it needs the one-expert row


class _Stop(Exception):
    pass


def test_compare_reuses_finished_models_and_resumes_stopped_ones(compared, monkeypatch):
    """Run again: finished trainings are reused, a stopped one (checkpoint_latest, no final) continues with --c,
    and another budget is refused instead of mixed with the trained one."""
    from moe_nnunet.evaluation import compare

    out, _ = compared
    report = json.loads((out / "comparison.json").read_text())
    fold = out / "nnUNet_results" / report["dataset"] / f"{MODELS[2][1]}__{MODELS[2][2]}__2d" / "fold_0"
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")   # as a training stopped midway
    shutil.rmtree(fold / "validation")
    runs = []

    def run(self, name, done, *cmd, **kwargs):
        runs.append((name, done, cmd))
        if cmd[:2] == ("moe_nnunet", "robustness"):
            raise _Stop
    monkeypatch.setattr(compare.Steps, "run", run)
    with pytest.raises(_Stop):
        compare.run_compare("brats_phantom", out, iterations=4, epoch_iterations=2, val_iterations=1,
                            max_features=16, batch_size=4, models=[MODELS[0][0], MODELS[2][0]])
    trainings = {name: (done, cmd) for name, done, cmd in runs if cmd[0] == "nnUNetv2_train"}
    assert all(done for name, (done, _) in trainings.items() if name != "train M4oE")
    done, cmd = trainings["train M4oE"]
    assert not done and cmd[-1] == "--c" and "nnUNetTrainerM4oE_compare" in cmd
    assert all(done for name, done, cmd in runs if cmd[0] != "nnUNetv2_train" and cmd[1] != "robustness")

    with pytest.raises(compare.CompareError, match="another budget"):
        compare.run_compare("brats_phantom", out, iterations=8, epoch_iterations=2, val_iterations=1,
                            max_features=16, batch_size=4, models=[MODELS[0][0], MODELS[2][0]])
