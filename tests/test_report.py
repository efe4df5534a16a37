"""`moe_nnunet report`: the HTML report of a trained model folder, beside a baseline, and without a gate."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_nnunet.cli import main
from moe_nnunet.evaluation.report import make_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def report(trained, nnunet_env, tmp_path_factory) -> Path:
    """The report of the trained M4oE model, written by the command a user runs."""
    out = tmp_path_factory.mktemp("report")
    proc = nnunet_env.run("moe_nnunet", "report", str(trained), "-o", str(out))
    assert "report.html" in proc.stdout
    return out / "report.html"


def copy_as(model: Path, folder: Path) -> Path:
    """A copy of a model folder's evaluation and predictions (no checkpoints, no gate files): what a plain
    nnUNetTrainer folder holds for the report."""
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.pth", "*.npz", "*.pkl", "gate_*", "report"))
    return folder


def image_sources(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8"))


def test_report_writes_html_summary_and_figures(report):
    out = report.parent
    for name in ("report.html", "summary.json", "gate_epochs.png", "gate_last_epoch.png", "gate_validation_cases.png",
                 "overlays.png", "progress_fold_0.png"):
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_summary_matches_nnunet_evaluation(report, trained):
    summary = json.loads((report.parent / "summary.json").read_text())
    nnunet = json.loads((trained / "fold_0" / "validation" / "summary.json").read_text())
    labels = json.loads((trained / "dataset.json").read_text())["labels"]
    assert set(summary["dice"]) == {n for n in labels if n != "background"}
    for name, d in summary["dice"].items():
        assert d["mean"] == pytest.approx(nnunet["mean"][str(labels[name])]["Dice"])
        assert d["per_fold"] == [d["mean"]]
    assert summary["mean_dice"]["mean"] == pytest.approx(nnunet["foreground_mean"]["Dice"])
    cases = {Path(c["prediction_file"]).name.removesuffix(".nii.gz") for c in nnunet["metric_per_case"]}
    assert set(summary["per_case"]) == cases
    assert summary["model"]["trainer"] == "nnUNetTrainerM4oE_debug" and summary["model"]["folds"] == ["0"]
    gate = summary["gate"]
    assert gate["experts"] == ["T1", "T2", "FLAIR"]
    assert sum(gate["last_epoch"]["mean"]) == pytest.approx(1, abs=1e-2)
    assert set(gate["validation_cases"]) == cases
    assert summary["training"]["epochs"] >= 1 and summary["training"]["wall_time_s"] > 0
    assert set(summary["versions"]) == {"moe_nnunet", "nnunetv2", "torch"}


def test_every_image_of_the_page_is_beside_it(report):
    sources = image_sources(report)
    assert len(sources) == 5
    for src in sources:
        assert not Path(src).is_absolute() and (report.parent / src).is_file(), src


def test_page_renders_in_a_browser_with_all_images(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the browser check is skipped")
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    proc = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_SIGNATURE and shot.stat().st_size > 20_000
    dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-ok="true"' in dom.stdout and 'data-images-count="5"' in dom.stdout


def test_baseline_side_by_side_and_a_model_without_gate(trained, nnunet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(nnunet_env.raw))
    baseline = copy_as(trained, tmp_path / trained.parent.name / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    evaluation = baseline / "fold_0" / "validation" / "summary.json"
    nnunet = json.loads(evaluation.read_text())
    nnunet["mean"]["1"]["Dice"] = 0.99
    evaluation.write_text(json.dumps(nnunet))

    page = make_report(trained, tmp_path / "compared", baselines=[baseline])
    summary = json.loads((page.parent / "summary.json").read_text())
    label_1 = next(n for n, d in summary["dice"].items() if d["value"] == "1")
    assert summary["baselines"]["nnUNetTrainer"]["dice"][label_1]["mean"] == 0.99
    assert "<td><b>0.990</b></td>" in page.read_text()  # the better model's value in bold

    page = make_report(baseline, tmp_path / "plain")
    summary = json.loads((page.parent / "summary.json").read_text())
    assert summary["gate"] is None
    assert not list(page.parent.glob("gate_*.png")) and (page.parent / "overlays.png").is_file()
    assert all((page.parent / src).is_file() for src in image_sources(page))


def test_unusable_folders_are_named_with_the_fix(trained, tmp_path, capsys):
    empty = tmp_path / "Dataset990_TinyPhantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    empty.mkdir(parents=True)
    assert main(["report", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moe_nnunet report: error:") and str(empty) in err and "no fold_N folders" in err

    (empty / "fold_0").mkdir()
    shutil.copyfile(trained / "dataset.json", empty / "dataset.json")
    assert main(["report", str(empty)]) == 1
    assert "--val" in capsys.readouterr().err

    other = copy_as(trained, tmp_path / "Dataset991_Other" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    assert main(["report", str(trained), "--baseline", str(other), "-o", str(tmp_path / "out")]) == 1
    assert "same dataset" in capsys.readouterr().err


def test_a_folder_not_named_like_a_trained_model_is_refused(tmp_path, capsys):
    from moe_nnunet.evaluation.model_folder import parse_model_folder_name

    assert parse_model_folder_name("nnUNetTrainerM4oE__nnUNetM4oEPlans__3d_fullres") == (
        "nnUNetTrainerM4oE", "nnUNetM4oEPlans", "3d_fullres")
    folder = tmp_path / "Dataset990_TinyPhantom" / "nnUNetTrainer__3d_fullres"
    folder.mkdir(parents=True)
    assert parse_model_folder_name(folder.name) is None
    assert main(["report", str(folder)]) == 1
    assert "is not named <Trainer>__<Plans>__<configuration>" in capsys.readouterr().err
