"""The demo's own logic (the trainings it drives are covered by the end-to-end tests and `moe_nnunet compare`'s
tests): its overview page and terminal table (headline, budget, curves, plateau verdicts), its scales, the
missing-modality evaluation it runs (`moe_nnunet robustness`) and how it refuses to mix runs or reports a failed
step."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from moe_nnunet.demo import SCALES, SETTINGS, demo_table, run_demo
from moe_nnunet.demo.scale import scale_json
from moe_nnunet.demo.summary import headline
from moe_nnunet.evaluation.curves import PLATEAU_RULE, plateau_verdict, plot_curves
from moe_nnunet.evaluation.report import write_demo_overview
from moe_nnunet.workflow.steps import StepFailed, Steps, epochs_logged
from conftest import PLANS, TINY_ID, TRAINER
from test_report import CHROMIUM, CHROMIUM_FLAGS, PNG_SIGNATURE


@pytest.fixture(scope="module")
def robustness(trained, nnunet_env, tmp_path_factory) -> Path:
    """`moe_nnunet robustness` of the trained M4oE model, predicted in-process (-np 0) as the CPU demo does."""
    out = tmp_path_factory.mktemp("robustness")
    proc = nnunet_env.run("moe_nnunet", "robustness", "-d", str(TINY_ID), "-tr", TRAINER, "-p", PLANS, "-f", "0",
                          "-o", str(out), "-device", "cpu", "-np", "0")
    assert "without FLAIR" in proc.stdout
    return out / "robustness.json"


def test_robustness_predicts_every_condition(robustness, planned):
    report = json.loads(robustness.read_text())
    splits = json.loads((planned / "splits_final.json").read_text())
    assert report["held_out_cases"] == sorted(splits[0]["val"])
    conditions = report["results"][TRAINER]
    assert list(conditions) == ["full input", "without T1", "without T2", "without FLAIR"]
    for name, r in conditions.items():
        assert r["how"] == ("complete" if name == "full input" else "experts masked")
        assert set(r["labels"]) == {"t1_blob", "t2_blob", "flair_blob", "t2_flair_combo"}
        assert all(0 <= v <= 1 for v in r["labels"].values()) and 0 <= r["mean"] <= 1
        for case in report["held_out_cases"]:
            folder = robustness.parent / "predictions" / TRAINER / name.replace(" ", "_")
            assert (folder / f"{case}.nii.gz").is_file()
    assert (robustness.parent / "robustness.md").read_text().count("| without FLAIR |") == 5  # 4 labels + mean


def test_report_shows_the_missing_modality_table(robustness, trained, nnunet_env, tmp_path):
    out = tmp_path / "report"
    nnunet_env.run("moe_nnunet", "report", str(trained), "--robustness", str(robustness), "-o", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_modality"]["results"] == json.loads(robustness.read_text())["results"]
    page = (out / "report.html").read_text()
    assert "<h2>A modality missing</h2>" in page and "<b>without T2</b>" in page

    other = json.loads(robustness.read_text())
    other["dataset"] = "Dataset999_Other"
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps(other))
    proc = nnunet_env.run("moe_nnunet", "report", str(trained), "--robustness", str(wrong), "-o", str(out),
                          check=False)
    assert proc.returncode == 1 and "Dataset999_Other" in proc.stderr


def _model(trainer: str, curve: list[float], validation: dict, **extra) -> dict:
    """A model's entry in a setting of summary.json, as `run_setting` writes it."""
    return {"trainer": trainer, "plans": "nnUNetPlans_compare", "epochs": len(curve), "parameters": 123456,
            "features_per_stage": [32, 32, 32, 32], "seconds_per_iteration": 0.123, "training_seconds": 90.0,
            "final_pseudo_dice": curve[-1], "final_ema_pseudo_dice": curve[-1], "plateau": plateau_verdict(curve),
            "validation": validation, "curve": {"pseudo_dice": curve, "ema": curve}, **extra}


FLAT = [0.3, 0.5, 0.6, 0.65, 0.66, 0.67, 0.67, 0.68, 0.67, 0.68, 0.68, 0.67]      # plateaued
RISING = [0.05 * i for i in range(12)]                                             # still 5 points per epoch


def _budget(patch: list[int]) -> dict:
    return {"configuration": "2d", "iterations": 360, "epochs": 12, "epoch_iterations": 30, "val_iterations": 4,
            "batch_size": 12, "patch_size": patch, "max_features": 32}


def _summary(robustness: Path, folder: Path) -> dict:
    """A demo summary.json as `run_demo` writes it (the phantom setting's missing-modality numbers from a real
    robustness run), with the settings' curves drawn into `folder`."""
    mm = json.loads(robustness.read_text())["results"][TRAINER]
    labels = list(mm["full input"]["labels"])
    validation = {"mean": 0.5, "labels": {lb: 0.5 for lb in labels}}
    lesion = {"mean": 0.61, "labels": {"lesion": 0.61}, "per_modality_mean": {"CT": 0.7, "MRI": 0.52}}
    settings = {
        "ct_mri": {"dataset": "Dataset910_LesionsCTMRI", "data": "REAL-derived", "title": SETTINGS[0].title,
                   "held_out_cases": ["CT_a", "MRI_b"], "labels": {"lesion": 1}, "channels": ["zscore"],
                   "modalities": {"CT_a": "CT", "MRI_b": "MRI"}, "report": "ct_mri/report/report.html",
                   "budget": _budget([32, 32]), "curves": "ct_mri/curves.png",
                   "models": {"nnU-Net": _model("nnUNetTrainer_compare", FLAT, lesion),
                              "M4oE": _model(TRAINER, FLAT, {"mean": 0.64, "labels": {"lesion": 0.64},
                                                            "per_modality_mean": {"CT": 0.71, "MRI": 0.57}},
                                             expert_features_per_stage=[16, 16, 16, 16],
                                             nnUNetv2_predict={"mean": 0.64, "labels": {"lesion": 0.64}})}},
        "phantom": {"dataset": "Dataset908_BraTSPhantom", "data": "SYNTHETIC", "title": SETTINGS[1].title,
                    "held_out_cases": ["p1"], "labels": {lb: i + 1 for i, lb in enumerate(labels)},
                    "channels": ["T1", "T2", "FLAIR"], "report": "phantom/report/report.html",
                    "budget": _budget([48, 48]), "curves": "phantom/curves.png",
                    "models": {"nnU-Net": _model("nnUNetTrainer_compare", FLAT, validation),
                               "M4oE": _model(TRAINER, RISING, validation)},
                    "missing_modality": {"nnU-Net": mm, "M4oE": {c: {**r, "mean": r["mean"] + 0.05}
                                                                  for c, r in mm.items()}}}}
    for key, r in settings.items():
        r["headline"] = headline(r)
        (folder / key).mkdir(parents=True, exist_ok=True)
        plot_curves({m: {"mean_fg_dice": v["curve"]["pseudo_dice"], "ema_fg_dice": v["curve"]["ema"],
                         "epoch_seconds": [3.0] * v["epochs"]} for m, v in r["models"].items()}, 30, key,
                    folder / r["curves"])
    return {"mode": "cpu", "device": "cpu", "configuration": "2d", "fold": 0, "note": "CPU scale: a note",
            "plateau_rule": PLATEAU_RULE, "settings": settings, "skipped": {},
            "step_seconds": {"phantom: train M4oE": 12.0}, "run_seconds": 60.0, "versions": {"moe_nnunet": "0"},
            "date": "2026-01-01T00:00:00"}


def test_headline_is_the_held_out_dice_and_what_m4oe_gains(robustness, tmp_path):
    summary = _summary(robustness, tmp_path)
    ct_mri, phantom = summary["settings"]["ct_mri"]["headline"], summary["settings"]["phantom"]["headline"]
    assert [r["input"] for r in ct_mri] == ["full input", "full input, the CT cases", "full input, the MRI cases"]
    assert ct_mri[0]["dice"] == {"nnU-Net": 0.61, "M4oE": 0.64} and ct_mri[0]["m4oe_gain_points"] == 3.0
    assert ct_mri[2]["m4oe_gain_points"] == 5.0
    assert [r["input"] for r in phantom] == ["full input", "without T1", "without T2", "without FLAIR"]
    assert all(r["m4oe_gain_points"] == 5.0 for r in phantom)


def test_overview_page_has_every_table_and_renders(robustness, tmp_path):
    summary = _summary(robustness, tmp_path)
    page = write_demo_overview(summary, tmp_path / "report.html")
    text = page.read_text()
    assert "<td><b>0.640</b></td>" in text                       # M4oE better on the lesion: bold
    assert "full input, the CT cases" in text and "nnUNetv2_predict" in text and "<td>+3.0</td>" in text
    assert "<td>without FLAIR</td>" in text and "<b>without FLAIR</b>" in text   # headline and per-label tables
    assert 'href="ct_mri/report/report.html"' in text and "CPU scale: a note" in text
    assert "360 training iterations (12 epochs x 30) at batch 12, patch 48x48" in text
    assert "per expert [16, 16, 16, 16]" in text and "<td>0.123</td>" in text
    table = demo_table(summary)
    assert "full input, the MRI cases" in table and "without T1" in table
    assert "+5.0 pt" in table and "360 iterations (12 epochs x 30), batch 12, patch 32x32, widths <= 32" in table
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the browser check is skipped")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_SIGNATURE


def test_plateau_verdicts_and_curves_are_in_the_summary_and_on_the_page(robustness, tmp_path):
    summary = _summary(robustness, tmp_path)
    phantom = summary["settings"]["phantom"]["models"]
    assert phantom["nnU-Net"]["plateau"]["plateaued"] is True
    assert phantom["M4oE"]["plateau"]["plateaued"] is False and phantom["M4oE"]["plateau"]["rise"] == 0.15
    json.dumps(summary)                                            # all of it is JSON
    text = write_demo_overview(summary, tmp_path / "report.html").read_text()
    for key in ("ct_mri", "phantom"):
        assert f'<img src="{key}/curves.png"' in text and (tmp_path / key / "curves.png").read_bytes()[:8] == \
            PNG_SIGNATURE
    assert text.count("<td><b>plateaued</b></td>") == 3 and text.count("<td><b>still rising</b></td>") == 1
    assert "<td>+0.150</td>" in text and PLATEAU_RULE in text
    # the phantom's M4oE is still rising: its headline says that the numbers are not a converged result
    assert text.count("Not every model reached its plateau") == 1 and "(M4oE still rising: see the curves" in text
    assert "Too few epochs" not in text
    table = demo_table(summary)
    assert table.count("plateaued") == 3 and "still rising, rise +0.150 over the 25 % before" in table


def test_every_mode_gives_each_setting_one_budget_the_plateau_rule_can_judge():
    """Every mode sizes every setting; the CPU budgets give the plateau rule at least 8 epochs on small 2d patches
    and narrow networks, --quick is the CPU data on a tiny budget, the GPU trains at least compare's 800."""
    for mode, scales in SCALES.items():
        assert set(scales) == {s.key for s in SETTINGS}, mode
    for key, cpu in SCALES["cpu"].items():
        assert cpu.budget.schedule["num_epochs"] >= 8 and cpu.budget.max_features <= 32
        size = cpu.data.get("shape", cpu.data.get("crop_size_zyx"))
        assert max(size[1:]) <= 48, key                               # nnU-Net's 2d patch: the in-plane size
        quick = SCALES["quick"][key]
        assert quick.data == cpu.data and quick.budget.iterations <= 8
        assert SCALES["cuda"][key].budget.iterations >= 800


def test_runs_of_another_mode_or_scale_are_not_mixed(tmp_path):
    (tmp_path / "demo_mode.json").write_text(json.dumps({"mode": "cuda"}))
    with pytest.raises(SystemExit, match="--fresh"):
        run_demo(tmp_path, device="cpu", quick=True)
    # the same mode at other numbers (SCALES edited since): refused as well
    other = json.loads(json.dumps(scale_json("quick")))
    other["phantom"]["budget"]["iterations"] = 6
    (tmp_path / "demo_mode.json").write_text(json.dumps({"mode": "quick", "scale": other}))
    with pytest.raises(SystemExit, match="other sizes or budgets"):
        run_demo(tmp_path, device="cpu", quick=True)


def test_a_failed_step_names_its_log_and_shows_its_end(tmp_path):
    steps = Steps(tmp_path / "logs", tmp_path / "raw", tmp_path / "pre", tmp_path / "res", "demo")
    with pytest.raises(StepFailed) as e:
        steps.run("bad plan", False, "moe_nnunet", "plan", "-d", "4242")
    message = str(e.value)
    assert "bad plan failed" in message and "bad_plan.log" in message and "4242" in message
    steps.run("bad plan", True, "moe_nnunet", "plan", "-d", "4242")  # done steps are not run again


def test_progress_counts_the_epochs_of_the_steps_last_run(tmp_path):
    """A step run again (another budget's run above it in the same log, or a resumed training) shows the epochs
    of its latest run, not the highest epoch the log ever held."""
    log = tmp_path / "train.log"
    assert epochs_logged(log)() == 0
    epochs = "".join(f"2026-01-01 10:00:0{e}.0: Epoch {e}\n" for e in range(8))
    log.write_text(f"\n$ nnUNetv2_train 908 2d 0\n{epochs}\n$ nnUNetv2_train 908 2d 0\n")
    assert epochs_logged(log)() == 0
    log.write_text(log.read_text() + "2026-01-01 11:00:00.0: Epoch 0\n2026-01-01 11:00:01.0: Epoch 1\n")
    assert epochs_logged(log)() == 2
    log.write_text(log.read_text() + "\n$ nnUNetv2_train 908 2d 0 --c\n2026-01-01 12:00:00.0: Epoch 2\n")
    assert epochs_logged(log)() == 3  # resumed: nnU-Net goes on counting
