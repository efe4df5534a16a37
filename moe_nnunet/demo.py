"""`moe_nnunet demo`: the whole pipeline on real packaged data, M4oE against nnU-Net's own network.

Data: the ICBM 2009a T1 template with grey/white-matter labels (real, shipped with nilearn), cropped into
cases (derived; see documentation/datasets.md). Steps, each a stock nnU-Net program or ours, each reused
when its output exists:
  build dataset -> nnUNetv2_plan_and_preprocess (nnU-Net's plans) -> moe_nnunet plan (M4oE plans)
  -> nnUNetv2_train fold 0, nnU-Net baseline and M4oE with the same schedule (each validates its held-out
  cases with nnU-Net's own evaluation) -> nnUNetv2_predict on the held-out cases -> summary.json, report.md
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from moe_nnunet.discovery import ext_trainer_dir

DATASET_ID = 902
PLANS = "nnUNetM4oEPlans"
SCHEDULES = {  # device -> (baseline trainer, M4oE trainer, dataset spacing in mm)
    "cpu": ("nnUNetTrainerDemo", "nnUNetTrainerM4oE_demo", 5.0),
    "cuda": ("nnUNetTrainer_100epochs", "nnUNetTrainerM4oE_100epochs", 2.0),
}


class Pipeline:
    """Runs the steps in one output folder, with nnU-Net's folders inside it and logs under logs/."""

    def __init__(self, output: Path, device: str) -> None:
        self.output = output
        self.device = device
        self.logs = output / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.raw, self.pre, self.res = output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results"
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                        nnUNet_results=str(self.res), nnUNet_extTrainer=str(ext_trainer_dir()))
        self.timings: dict[str, float] = {}

    def step(self, name: str, done: bool, *cmd: str) -> None:
        """Run `cmd` (a console script of this environment) unless `done`; one summary line either way."""
        if done:
            print(f"[demo] {name}: already done, reused")
            return
        log = self.logs / f"{name.replace(' ', '_')}.log"
        print(f"[demo] {name} ... (log: {log})", flush=True)
        start = time.time()
        exe = str(Path(sys.executable).parent / cmd[0])
        with open(log, "w") as f:
            proc = subprocess.run([exe, *cmd[1:]], env=self.env, stdout=f, stderr=subprocess.STDOUT)
        self.timings[name] = round(time.time() - start, 1)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"[demo] {name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
        print(f"[demo] {name}: done in {self.timings[name]:.0f} s")

    def model_folder(self, trainer: str, plans: str) -> Path:
        return self.res / self.dataset_name / f"{trainer}__{plans}__3d_fullres"

    @property
    def dataset_name(self) -> str:
        return next(self.raw.glob(f"Dataset{DATASET_ID:03d}_*")).name


def _held_out_cases(pipe: Pipeline) -> list[str]:
    splits = json.loads((pipe.pre / pipe.dataset_name / "splits_final.json").read_text())
    return sorted(splits[0]["val"])


def _dice_table(summary_file: Path) -> dict:
    summary = json.loads(summary_file.read_text())
    return {"mean_foreground_dice": summary["foreground_mean"]["Dice"],
            "per_label_dice": {k: v["Dice"] for k, v in summary["mean"].items()}}


def run_demo(output: Path, device: str = "cpu", fresh: bool = False) -> dict:
    if fresh and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    baseline, m4oe, spacing = SCHEDULES[device]
    pipe = Pipeline(output, device)
    start = time.time()

    from moe_nnunet.datasets.nilearn_tissue import build_icbm_tissue
    if not list(pipe.raw.glob(f"Dataset{DATASET_ID:03d}_*")):
        print(f"[demo] building the ICBM152 tissue dataset (real template, {spacing} mm, 10 crops)", flush=True)
        build_icbm_tissue(pipe.raw, DATASET_ID, spacing_mm=spacing, num_cases=10)
    d = str(DATASET_ID)
    pre = pipe.pre / pipe.dataset_name
    pipe.step("nnU-Net plan and preprocess", (pre / "nnUNetPlans.json").is_file(),
              "nnUNetv2_plan_and_preprocess", "-d", d, "-c", "3d_fullres", "-np", "2",
              "--verify_dataset_integrity")
    pipe.step("moe_nnunet plan", (pre / f"{PLANS}.json").is_file(), "moe_nnunet", "plan", "-d", d)
    # M4oE plans reuse nnU-Net's preprocessed 3d_fullres data (same data identifier), so nothing to redo here
    models = {"nnU-Net": (baseline, "nnUNetPlans"), "M4oE": (m4oe, PLANS)}
    for label, (trainer, plans) in models.items():
        folder = pipe.model_folder(trainer, plans)
        pipe.step(f"train {label}", (folder / "fold_0" / "validation" / "summary.json").is_file(),
                  "nnUNetv2_train", d, "3d_fullres", "0", "-tr", trainer, "-p", plans, "-device", device)

    held_out = _held_out_cases(pipe)
    inputs = output / "held_out_images"
    inputs.mkdir(exist_ok=True)
    for case in held_out:
        for f in (pipe.raw / pipe.dataset_name / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, inputs / f.name)
    predictions = output / "predictions_M4oE"
    pipe.step("predict held-out cases with M4oE", (predictions / f"{held_out[-1]}.nii.gz").is_file(),
              "nnUNetv2_predict", "-i", str(inputs), "-o", str(predictions), "-d", d, "-c", "3d_fullres",
              "-f", "0", "-tr", m4oe, "-p", PLANS, "-device", device)
    gt = output / "held_out_labels"  # nnU-Net's evaluation expects a prediction for every reference file
    gt.mkdir(exist_ok=True)
    for case in held_out:
        shutil.copy(pipe.raw / pipe.dataset_name / "labelsTr" / f"{case}.nii.gz", gt / f"{case}.nii.gz")
    pipe.step("evaluate predictions", (predictions / "summary.json").is_file(), "nnUNetv2_evaluate_folder",
              str(gt), str(predictions), "-djfile", str(predictions / "dataset.json"),
              "-pfile", str(predictions / "plans.json"))

    labels = json.loads((pipe.raw / pipe.dataset_name / "dataset.json").read_text())["labels"]
    names = {str(v): k for k, v in labels.items()}
    results = {label: _dice_table(pipe.model_folder(t, p) / "fold_0" / "validation" / "summary.json")
               for label, (t, p) in models.items()}
    results["M4oE (nnUNetv2_predict)"] = _dice_table(predictions / "summary.json")
    summary = {"dataset": pipe.dataset_name, "data": "real (ICBM 2009a T1 template via nilearn), derived crops",
               "device": device, "held_out_cases": held_out,
               "trainers": {k: v[0] for k, v in models.items()}, "label_names": names, "results": results,
               "step_seconds": pipe.timings, "total_seconds": round(time.time() - start, 1)}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# moe_nnunet demo", "", f"Dataset: {summary['dataset']} ({summary['data']}), device {device}, "
             f"fold 0 held-out cases: {', '.join(held_out)}.", "",
             "| model | " + " | ".join(names[k] for k in sorted(names, key=int) if k != "0") + " | mean |",
             "|---|" + "---|" * (len(names))]
    for model, r in results.items():
        per = [f"{r['per_label_dice'].get(k, float('nan')):.3f}" for k in sorted(names, key=int) if k != "0"]
        lines.append(f"| {model} | " + " | ".join(per) + f" | {r['mean_foreground_dice']:.3f} |")
    lines += ["", "Dice from nnU-Net's own evaluation. Step times (s): " + json.dumps(pipe.timings)]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    report = output / "report"
    pipe.step("HTML report", (report / "report.html").is_file(), "moe_nnunet", "report",
              str(pipe.model_folder(m4oe, PLANS)), "--baseline", str(pipe.model_folder(baseline, "nnUNetPlans")),
              "-o", str(report))
    print(f"[demo] wrote {output / 'summary.json'}, {output / 'report.md'} and {report / 'report.html'}")
    return summary
