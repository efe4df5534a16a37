"""The demo's own logic (the trainings it drives are covered by the end-to-end tests): its overview page, the
missing-modality evaluation it runs (`moe_nnunet robustness`) and how it refuses to mix runs or reports a failed
step."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from moe_nnunet.demo import MODES, SETTINGS, Pipeline, demo_table, run_demo
from moe_nnunet.evaluation.report import write_demo_overview
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


def _summary(robustness: Path) -> dict:
    """A demo summary.json as `run_demo` writes it (the phantom setting's numbers from a real robustness run)."""
    mm = json.loads(robustness.read_text())["results"][TRAINER]
    labels = list(mm["full input"]["labels"])
    validation = {"mean": 0.5, "labels": {lb: 0.5 for lb in labels}}
    return {
        "mode": "quick", "device": "cpu", "note": "--quick: the Dice means nothing",
        "schedule": {"epochs": 2, "fold": 0, "trainers": MODES["quick"][0]},
        "settings": {
            "ct_mri": {"dataset": "Dataset910_LesionsCTMRI", "data": "REAL-derived", "title": SETTINGS[0].title,
                       "held_out_cases": ["CT_a", "MRI_b"], "labels": {"lesion": 1}, "channels": ["zscore"],
                       "modalities": {"CT_a": "CT", "MRI_b": "MRI"}, "report": "ct_mri/report/report.html",
                       "models": {"nnU-Net": {"trainer": "nnUNetTrainerDebug", "plans": "nnUNetPlans",
                                              "validation": {"mean": 0.61, "labels": {"lesion": 0.61},
                                                             "per_modality_mean": {"CT": 0.7, "MRI": 0.52}}},
                                  "M4oE": {"trainer": TRAINER, "plans": PLANS,
                                           "validation": {"mean": 0.64, "labels": {"lesion": 0.64},
                                                          "per_modality_mean": {"CT": 0.71, "MRI": 0.57}},
                                           "nnUNetv2_predict": {"mean": 0.64, "labels": {"lesion": 0.64}}}}},
            "phantom": {"dataset": "Dataset901_MultiModalPhantom", "data": "SYNTHETIC", "title": SETTINGS[1].title,
                        "held_out_cases": ["p1"], "labels": {lb: i + 1 for i, lb in enumerate(labels)},
                        "channels": ["T1", "T2", "FLAIR"], "report": "phantom/report/report.html",
                        "models": {"nnU-Net": {"trainer": "nnUNetTrainerDebug", "plans": "nnUNetPlans",
                                               "validation": validation},
                                   "M4oE": {"trainer": TRAINER, "plans": PLANS, "validation": validation}},
                        "missing_modality": {"nnU-Net": mm, "M4oE": mm}}},
        "skipped": {}, "step_seconds": {"phantom: train M4oE": 12.0}, "run_seconds": 60.0,
        "versions": {"moe_nnunet": "0"}, "date": "2026-01-01T00:00:00"}


def test_overview_page_has_every_table_and_renders(robustness, tmp_path):
    summary = _summary(robustness)
    page = write_demo_overview(summary, tmp_path / "report.html")
    text = page.read_text()
    assert "<td><b>0.640</b></td>" in text                       # M4oE better on the lesion: bold
    assert "mean over the 1 CT cases" in text and "nnUNetv2_predict" in text
    assert "With a modality missing" in text and "<b>without FLAIR</b>" in text
    assert 'href="ct_mri/report/report.html"' in text and "the Dice means nothing" in text
    table = demo_table(summary)
    assert "lesion" in table and "without T1:" in table
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the browser check is skipped")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_SIGNATURE


def test_progress_bars_and_note_match_the_trainers_schedules():
    """The demo's epoch counts (progress bars, note) are those of the trainers it runs."""
    from moe_nnunet.trainers.variants import DEBUG_SCHEDULE, DEMO_SCHEDULE

    assert MODES["cpu"][1] == DEMO_SCHEDULE["num_epochs"] and MODES["quick"][1] == DEBUG_SCHEDULE["num_epochs"]
    assert MODES["cuda"][1] == 100 and all(t.endswith("_100epochs") for t in MODES["cuda"][0].values())
    assert all(t.endswith("_demo") or t == "nnUNetTrainerDemo" for t in MODES["cpu"][0].values())


def test_runs_of_another_mode_are_not_mixed(tmp_path):
    (tmp_path / "demo_mode.json").write_text(json.dumps({"mode": "cuda"}))
    with pytest.raises(SystemExit, match="--fresh"):
        run_demo(tmp_path, device="cpu", quick=True)


def test_a_failed_step_names_its_log_and_shows_its_end(tmp_path):
    pipe = Pipeline(tmp_path, "cpu")
    with pytest.raises(SystemExit) as e:
        pipe.step("bad plan", False, "moe_nnunet", "plan", "-d", "4242")
    message = str(e.value)
    assert "bad plan failed" in message and "bad_plan.log" in message and "4242" in message
    pipe.step("bad plan", True, "moe_nnunet", "plan", "-d", "4242")  # done steps are not run again
