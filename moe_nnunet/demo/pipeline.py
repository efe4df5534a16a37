"""`moe_nnunet demo`: the whole pipeline in two settings, M4oE against nnU-Net's own network.

Settings (each a dataset, its models and its evaluation; ``SETTINGS``):

* ``ct_mri`` -- M4oE's own setting, on REAL data: the lung CT tumour and brain MRI lesion crops of the pyradiomics
  source package, combined by ``moe_nnunet combine`` into one single-channel dataset with a CT expert and an MRI
  expert. nnU-Net's ``nnUNetTrainer`` and ``nnUNetTrainerM4oE`` are trained on fold 0 with the same schedule; the
  held-out cases of both modalities are then predicted with stock ``nnUNetv2_predict``.
* ``phantom`` -- the SYNTHETIC 3-channel phantom (each label visible only in known channels). nnU-Net, nnU-Net with
  modality dropout (``nnUNetTrainerChannelDropout``) and M4oE are trained the same way, then the held-out cases are
  predicted with the full input and with each modality removed in turn (``moe_nnunet.evaluation.robustness``).

Each step is a stock nnU-Net program or ours, run as a subprocess with its output in ``logs/`` and a progress bar,
and is reused when its output exists (``--fresh`` redoes everything). The output folder then holds ``report.html``
(an overview linking one detailed report per setting) and ``summary.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moe_nnunet.discovery import ext_trainer_dir
from moe_nnunet.evaluation.robustness import copy_held_out, held_out_cases

M4OE_PLANS = "nnUNetM4oEPlans"
CONFIGURATION = "3d_fullres"

# mode -> model role -> trainer, and the epochs they train (the progress bars' length). The CPU demo trains
# 6 epochs of 10 iterations, "quick" 2 of 4 (a check that everything runs: its numbers mean nothing), "cuda"
# nnU-Net's 100-epoch schedule.
MODES = {
    "cpu": ({"nnU-Net": "nnUNetTrainerDemo", "nnU-Net + dropout": "nnUNetTrainerChannelDropout_demo",
             "M4oE": "nnUNetTrainerM4oE_demo"}, 6),
    "quick": ({"nnU-Net": "nnUNetTrainerDebug", "nnU-Net + dropout": "nnUNetTrainerChannelDropout_debug",
               "M4oE": "nnUNetTrainerM4oE_debug"}, 2),
    "cuda": ({"nnU-Net": "nnUNetTrainer_100epochs", "nnU-Net + dropout": "nnUNetTrainerChannelDropout_100epochs",
              "M4oE": "nnUNetTrainerM4oE_100epochs"}, 100),
}
PLANS = {"nnU-Net": "nnUNetPlans", "nnU-Net + dropout": "nnUNetPlans", "M4oE": M4OE_PLANS}


@dataclass(frozen=True)
class Setting:
    key: str
    title: str
    data: str                      # what the data is: real, derived or synthetic
    dataset_id: int
    roles: tuple[str, ...]         # models trained, keys of PLANS
    missing_modality: bool         # evaluate with each modality removed


SETTINGS = (
    Setting("ct_mri", "CT + MRI experts across datasets (M4oE's setting)",
            "REAL-derived: crops around the lung tumours of 2 CT scans and the lesions of 2 brain MRI scans "
            "(pyradiomics 3.0.1 test data), combined into one dataset with a modality tag per case",
            910, ("nnU-Net", "M4oE"), False),
    Setting("phantom", "Missing modality (3-channel phantom)",
            "SYNTHETIC: 3-channel phantom (T1/T2/FLAIR-named), each label visible only in known channel(s), "
            "per-case intensity gain, bias field, noise, anisotropic spacing",
            901, ("nnU-Net", "nnU-Net + dropout", "M4oE"), True),
)
LUNG_ID, BRAIN_ID = 903, 904


class DataUnavailable(RuntimeError):
    """Real data could not be fetched (no access to PyPI): the setting is skipped, the others still run."""


def _dataset_options(device: str) -> dict:
    """Builder arguments: coarse grids on the CPU (small patches train in minutes), the builders' own on a GPU."""
    if device == "cuda":
        return {"phantom": {"num_cases": 20}, "lesion": {"num_cases": 10}}
    return {"phantom": {"num_cases": 20, "shape": (20, 32, 32), "spacing": (3.0, 1.5, 1.5)},
            "lesion": {"num_cases": 10, "spacing_zyx": (5.0, 2.0, 2.0), "crop_size_zyx": (16, 32, 32)}}


class Pipeline:
    """Runs the steps in one output folder, with nnU-Net's folders inside it and each step's log under logs/."""

    def __init__(self, output: Path, device: str) -> None:
        self.output = output
        self.device = device
        self.logs = output / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.raw, self.pre, self.res = output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results"
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                        nnUNet_results=str(self.res), nnUNet_extTrainer=str(ext_trainer_dir()))
        # nnU-Net's default of 8 worker processes for export, evaluation and preprocessing (each a fresh
        # interpreter importing torch) costs a minute per validation on a 2-core machine; 1 per 2 cores, at most 4
        self.env.setdefault("nnUNet_def_n_proc", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
        self.n_proc = self.env["nnUNet_def_n_proc"]
        self.timings: dict[str, float] = {}

    def step(self, name: str, done: bool, *cmd: str, total: int | None = None,
             progress: Callable[[], int] | None = None, unit: str = "step") -> None:
        """Run `cmd` (a console script of this environment) unless `done`, with a progress bar (`progress()`
        counts what is finished out of `total`; without it the bar shows the elapsed time) and one summary line."""
        from tqdm import tqdm

        if done:
            print(f"[demo] {name}: already done, reused")
            return
        log = self.log_file(name)
        start = time.time()
        exe = str(Path(sys.executable).parent / cmd[0])
        with open(log, "w") as f, tqdm(total=total, desc=f"[demo] {name}", unit=unit, leave=False,
                                       bar_format=None if total else "{desc}: {elapsed}", file=sys.stdout) as bar:
            proc = subprocess.Popen([exe, *cmd[1:]], env=self.env, stdout=f, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                time.sleep(1.0)
                if progress is not None:
                    bar.update(min(progress(), total or 0) - bar.n)
                else:
                    bar.refresh()
        self.timings[name] = round(time.time() - start, 1)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"[demo] {name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
        print(f"[demo] {name}: done in {self.timings[name]:.0f} s (log: {log.relative_to(self.output)})", flush=True)

    def log_file(self, step: str) -> Path:
        return self.logs / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', step)}.log"

    def dataset_name(self, dataset_id: int) -> str | None:
        found = sorted(self.raw.glob(f"Dataset{dataset_id:03d}_*"))
        return found[0].name if found else None

    def model_folder(self, dataset_id: int, trainer: str, plans: str) -> Path:
        return self.res / str(self.dataset_name(dataset_id)) / f"{trainer}__{plans}__{CONFIGURATION}"


def _count_lines(log: Path, pattern: str) -> Callable[[], int]:
    regex = re.compile(pattern)

    def count() -> int:
        try:
            return len(regex.findall(log.read_text(errors="replace")))
        except FileNotFoundError:
            return 0
    return count


def _count_files(folder: Path, pattern: str) -> Callable[[], int]:
    return lambda: len(list(folder.glob(pattern)))


def _dice(summary_file: Path, names: dict[str, str], case_groups: dict[str, str] | None = None) -> dict:
    """Mean and per-label Dice (by label name; `names` maps label values to names) from an nnU-Net evaluation
    summary; with `case_groups` (case -> modality) also the mean Dice per group."""
    summary = json.loads(summary_file.read_text())
    out = {"mean": round(summary["foreground_mean"]["Dice"], 4),
           "labels": {names.get(k, k): round(v["Dice"], 4) for k, v in summary["mean"].items()}}
    if case_groups:
        groups: dict[str, list[float]] = {}
        for entry in summary["metric_per_case"]:
            case = Path(entry["prediction_file"]).name.split(".")[0]
            values = [m["Dice"] for m in entry["metrics"].values() if m["Dice"] == m["Dice"]]  # skip NaN
            if values:
                groups.setdefault(case_groups.get(case, "?"), []).append(sum(values) / len(values))
        out["per_modality_mean"] = {g: round(sum(v) / len(v), 4) for g, v in sorted(groups.items())}
    return out


def _build_datasets(pipe: Pipeline, setting: Setting, device: str) -> None:
    options = _dataset_options(device)
    if pipe.dataset_name(setting.dataset_id):
        print(f"[demo] {setting.key}: dataset {pipe.dataset_name(setting.dataset_id)} already built, reused")
        return
    start = time.time()
    if setting.key == "phantom":
        from moe_nnunet.datasets.phantom import build_phantom
        build_phantom(pipe.raw, setting.dataset_id, **options["phantom"])
    else:
        from moe_nnunet.datasets.combine import combine_datasets
        from moe_nnunet.datasets.pyradiomics_lesions import build_brain_mri, build_lung_ct, fetch_pyradiomics_data
        try:
            fetch_pyradiomics_data()
        except RuntimeError as e:
            raise DataUnavailable(str(e)) from e
        for dataset_id, builder in ((LUNG_ID, build_lung_ct), (BRAIN_ID, build_brain_mri)):
            if not pipe.dataset_name(dataset_id):
                builder(pipe.raw, dataset_id, **options["lesion"])
        combine_datasets([LUNG_ID, BRAIN_ID], setting.dataset_id, "LesionsCTMRI", raw_root=pipe.raw)
    pipe.timings[f"{setting.key}: build dataset"] = round(time.time() - start, 1)
    print(f"[demo] {setting.key}: built {pipe.dataset_name(setting.dataset_id)} in {time.time() - start:.0f} s")


def run_setting(pipe: Pipeline, setting: Setting, mode: str) -> dict:
    """Build, plan, preprocess, train, predict and evaluate one setting; returns its part of summary.json."""
    trainers, epochs = MODES[mode]
    device = pipe.device
    _build_datasets(pipe, setting, device)
    d, name = str(setting.dataset_id), pipe.dataset_name(setting.dataset_id)
    pre = pipe.pre / name
    k = setting.key
    num_cases = json.loads((pipe.raw / name / "dataset.json").read_text())["numTraining"]
    preprocessed = len(list((pre / f"nnUNetPlans_{CONFIGURATION}").glob("*.pkl"))) >= num_cases  # a file per case
    pipe.step(f"{k}: nnU-Net plan and preprocess", preprocessed,
              "nnUNetv2_plan_and_preprocess", "-d", d, "-c", CONFIGURATION, "-np", pipe.n_proc, "-npfp", pipe.n_proc,
              "--verify_dataset_integrity")
    pipe.step(f"{k}: moe_nnunet plan", (pre / f"{M4OE_PLANS}.json").is_file(), "moe_nnunet", "plan", "-d", d)
    # the M4oE plans reuse nnU-Net's preprocessed 3d_fullres data (same data identifier): nothing to preprocess
    models = {role: (trainers[role], PLANS[role]) for role in setting.roles}
    for role, (trainer, plans) in models.items():
        fold = pipe.model_folder(setting.dataset_id, trainer, plans) / "fold_0"
        step = f"{k}: train {role}"
        pipe.step(step, (fold / "validation" / "summary.json").is_file(),
                  "nnUNetv2_train", d, CONFIGURATION, "0", "-tr", trainer, "-p", plans, "-device", device,
                  total=epochs, progress=_count_lines(pipe.log_file(step), r"Epoch time"), unit="epoch")

    raw = pipe.raw / name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    tags = dataset_json.get("moe_nnunet", {}).get("case_modality")
    held_out = held_out_cases(pre, 0)
    names = {str(v): k_ for k_, v in dataset_json["labels"].items()}
    result = {"dataset": name, "data": setting.data, "title": setting.title, "held_out_cases": held_out,
              "labels": {k_: v for k_, v in dataset_json["labels"].items() if k_ != "background"},
              "channels": list(dataset_json["channel_names"].values()),
              "models": {role: {"trainer": t, "plans": p,
                                "validation": _dice(pipe.model_folder(setting.dataset_id, t, p) / "fold_0" /
                                                    "validation" / "summary.json", names, tags)}
                         for role, (t, p) in models.items()}}
    if tags:
        result["modalities"] = {c: tags[c] for c in held_out}

    setting_out = pipe.output / k
    if setting.missing_modality:
        robustness = setting_out / "robustness"
        conditions = len(result["channels"]) + 1
        pipe.step(f"{k}: predict with each modality removed", (robustness / "robustness.json").is_file(),
                  "moe_nnunet", "robustness", "-d", d, "-c", CONFIGURATION, "-tr", *[t for t, _ in models.values()],
                  "-p", *[p for _, p in models.values()], "-f", "0", "-o", str(robustness), "-device", device,
                  "-np", "0" if device == "cpu" else pipe.n_proc, total=len(models) * conditions,
                  progress=_count_files(robustness / "predictions", "*/*/summary.json"), unit="prediction")
        report = json.loads((robustness / "robustness.json").read_text())
        by_trainer = {t: role for role, (t, _) in models.items()}
        result["missing_modality"] = {by_trainer[t]: r for t, r in report["results"].items()}
    else:
        trainer, plans = models["M4oE"]
        ending = dataset_json["file_ending"]
        inputs, labels = copy_held_out(raw, held_out, ending, setting_out)
        predictions = setting_out / "predictions_M4oE"
        pipe.step(f"{k}: predict held-out cases with nnUNetv2_predict (M4oE)",
                  all((predictions / f"{c}{ending}").is_file() for c in held_out),
                  "nnUNetv2_predict", "-i", str(inputs), "-o", str(predictions), "-d", d, "-c", CONFIGURATION,
                  "-f", "0", "-tr", trainer, "-p", plans, "-device", device, "-npp", pipe.n_proc, "-nps", pipe.n_proc,
                  total=len(held_out), progress=_count_files(predictions, f"*{ending}"), unit="case")
        pipe.step(f"{k}: evaluate the predictions", (predictions / "summary.json").is_file(),
                  "nnUNetv2_evaluate_folder", str(labels), str(predictions), "-djfile",
                  str(predictions / "dataset.json"), "-pfile", str(predictions / "plans.json"), "-np", pipe.n_proc)
        result["models"]["M4oE"]["nnUNetv2_predict"] = _dice(predictions / "summary.json", names, tags)

    folders = {role: pipe.model_folder(setting.dataset_id, t, p) for role, (t, p) in models.items()}
    report_dir = setting_out / "report"
    extra = ["--robustness", str(setting_out / "robustness" / "robustness.json")] if setting.missing_modality else []
    pipe.step(f"{k}: HTML report", (report_dir / "report.html").is_file(), "moe_nnunet", "report",
              str(folders["M4oE"]), "--baseline", *[str(f) for r, f in folders.items() if r != "M4oE"],
              "-o", str(report_dir), *extra)
    result["report"] = str((report_dir / "report.html").relative_to(pipe.output))
    return result


def run_demo(output: Path, device: str = "cpu", fresh: bool = False, quick: bool = False,
             settings: tuple[str, ...] = tuple(s.key for s in SETTINGS)) -> dict:
    """Run the chosen settings in `output`; write summary.json and report.html there; return the summary."""
    from moe_nnunet.evaluation.report import versions, write_demo_overview

    if fresh and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else device
    pipe = Pipeline(output, device)
    start = time.time()
    summary_file, mode_file = output / "summary.json", output / "demo_mode.json"
    earlier = json.loads(mode_file.read_text())["mode"] if mode_file.is_file() else mode
    if earlier != mode:  # datasets and trainers differ between modes: never mix their steps
        raise SystemExit(f"[demo] {output} holds a demo run in mode {earlier!r}, not {mode!r}: "
                         f"add --fresh to start over, or choose another --output")
    mode_file.write_text(json.dumps({"mode": mode}))
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    results, skipped = {}, {}
    for setting in (s for s in SETTINGS if s.key in settings):
        print(f"[demo] === {setting.key}: {setting.title} ===", flush=True)
        try:
            results[setting.key] = run_setting(pipe, setting, mode)
        except DataUnavailable as e:
            skipped[setting.key] = str(e)
            print(f"[demo] {setting.key} skipped: {e}", flush=True)
    summary = {"mode": mode, "device": device,
               "schedule": {"epochs": MODES[mode][1], "fold": 0,
                            "trainers": {s: MODES[mode][0][s] for s in PLANS}},
               "settings": results, "skipped": skipped,
               "step_seconds": {**previous.get("step_seconds", {}), **pipe.timings},
               "run_seconds": round(time.time() - start, 1), "versions": versions(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if quick:
        summary["note"] = "--quick: 2 epochs of 4 iterations, a check that the pipeline runs; the Dice means nothing"
    elif mode == "cpu":
        summary["note"] = ("CPU schedule: 6 epochs of 10 iterations per model, a few minutes of training. The networks "
                           "are far from converged, so the tables show how fast each model starts to learn, not how "
                           "good it gets, and they vary from run to run; nnU-Net's convolutions learn faster in the "
                           "first iterations than M4oE's transformer experts. On a GPU the demo trains 100 epochs of "
                           "250 iterations per model.")
    summary["steps_total_seconds"] = round(sum(summary["step_seconds"].values()), 1)  # earlier runs included
    summary_file.write_text(json.dumps(summary, indent=2))
    page = write_demo_overview(summary, output / "report.html")
    print(demo_table(summary))
    print(f"[demo] finished in {summary['run_seconds'] / 60:.1f} min (all steps, earlier runs included: "
          f"{summary['steps_total_seconds'] / 60:.1f} min); open {page} (summary: {summary_file})")
    return summary


def demo_table(summary: dict) -> str:
    """Plain-text tables of the demo's Dice, for the terminal."""
    lines = []
    for key, r in summary["settings"].items():
        labels = list(r["labels"])
        lines += ["", f"{r['title']} -- {r['dataset']}, {len(r['held_out_cases'])} held-out cases of fold 0",
                  f"  {'model':<28}" + "".join(f"{lb[:14]:>15}" for lb in labels) + f"{'mean':>8}"]
        for role, m in r["models"].items():
            v = m["validation"]
            lines.append(f"  {role:<28}" + "".join(f"{v['labels'].get(lb, float('nan')):>15.3f}" for lb in labels)
                         + f"{v['mean']:>8.3f}")
        if "missing_modality" in r:
            lines.append("  mean Dice with a modality removed:")
            for role, conditions in r["missing_modality"].items():
                lines.append(f"  {role:<28}" + "".join(f"{c}: {x['mean']:.3f}   " for c, x in conditions.items()))
    return "\n".join(lines)
