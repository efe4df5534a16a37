"""`moe_nnunet demo`: the whole pipeline in two settings, M4oE against nnU-Net's own network on one budget.

Settings (each a dataset, its models and its evaluation; `moe_nnunet.demo.scale.SETTINGS`):

* ``ct_mri`` -- M4oE's own setting, on REAL data: the lung CT tumour and brain MRI lesion crops of the pyradiomics
  source package, combined by ``moe_nnunet combine`` into one single-channel dataset with a CT expert and an MRI
  expert. nnU-Net and M4oE are trained on fold 0; the held-out cases of both modalities are then predicted with
  stock ``nnUNetv2_predict`` and scored by ``nnUNetv2_evaluate_folder``.
* ``phantom`` -- the SYNTHETIC BraTS-like 4-channel phantom (labels that need several channels). nnU-Net, nnU-Net
  with channel dropout and M4oE are trained the same way, then the held-out cases are predicted with the full input
  and with each modality removed in turn (``moe_nnunet robustness``).

Both run nnU-Net's 2d configuration through `moe_nnunet.evaluation.equal_budget.train_models`, the machinery of
``moe_nnunet compare``: narrowed plans for every model alike and one iteration budget (the mode's `SCALES`), each
model's validation curve and plateau verdict. Each step is a stock nnU-Net program or ours in a subprocess, with its
output in ``logs/`` and a progress bar, and is reused when its output exists (``--fresh`` redoes everything). The
output folder then holds ``report.html`` (an overview linking one detailed report per setting) and ``summary.json``.
"""
from __future__ import annotations

import datetime
import json
import shutil
import time
from pathlib import Path

from moe_nnunet.demo.scale import BRAIN_ID, LUNG_ID, NOTES, SCALES, SETTINGS, Setting, SettingScale, scale_json
from moe_nnunet.demo.summary import demo_table, dice_summary, headline
from moe_nnunet.evaluation.curves import PLATEAU_RULE, plot_curves
from moe_nnunet.evaluation.equal_budget import CONFIGURATION, Trained, evaluate_missing, train_models
from moe_nnunet.evaluation.robustness import copy_held_out, held_out_cases
from moe_nnunet.workflow.steps import Steps, count_files

__all__ = ["DataUnavailable", "run_setting", "run_demo"]


class DataUnavailable(RuntimeError):
    """Real data could not be fetched (no access to PyPI): the setting is skipped, the others still run."""


def _build_dataset(steps: Steps, setting: Setting, data: dict) -> None:
    if steps.dataset_name(setting.dataset_id):
        print(f"[demo] {setting.key}: dataset {steps.dataset_name(setting.dataset_id)} already built, reused")
        return
    start = time.time()
    if setting.key == "phantom":
        from moe_nnunet.datasets.brats_phantom import build_brats_phantom
        build_brats_phantom(steps.raw, setting.dataset_id, **data)
    else:
        from moe_nnunet.datasets.combine import combine_datasets
        from moe_nnunet.datasets.pyradiomics_lesions import build_brain_mri, build_lung_ct, fetch_pyradiomics_data
        try:
            fetch_pyradiomics_data()
        except RuntimeError as e:
            raise DataUnavailable(str(e)) from e
        for dataset_id, builder in ((LUNG_ID, build_lung_ct), (BRAIN_ID, build_brain_mri)):
            if not steps.dataset_name(dataset_id):
                builder(steps.raw, dataset_id, **data)
        combine_datasets([LUNG_ID, BRAIN_ID], setting.dataset_id, "LesionsCTMRI", raw_root=steps.raw)
    steps.seconds[f"{setting.key}: build dataset"] = round(time.time() - start, 1)
    print(f"[demo] {setting.key}: built {steps.dataset_name(setting.dataset_id)} in {time.time() - start:.0f} s")


def _predict_held_out(steps: Steps, setting: Setting, trained: Trained, held_out: list[str], device: str,
                      out: Path) -> Path:
    """The held-out cases through stock nnUNetv2_predict (M4oE, not told any case's modality) and
    nnUNetv2_evaluate_folder; returns the evaluation's summary.json."""
    k, d = setting.key, str(setting.dataset_id)
    m = trained.models["M4oE"]
    ending = trained.dataset_json["file_ending"]
    inputs, labels = copy_held_out(steps.raw / trained.dataset, held_out, ending, out)
    predictions = out / "predictions_M4oE"
    model = trained.folders["M4oE"] / "checkpoint_final.pth"
    fresh = (predictions / "summary.json").is_file() and \
        (predictions / "summary.json").stat().st_mtime > model.stat().st_mtime
    steps.run(f"{k}: predict held-out cases with nnUNetv2_predict (M4oE)", fresh,
              "nnUNetv2_predict", "-i", str(inputs), "-o", str(predictions), "-d", d, "-c", CONFIGURATION,
              "-f", "0", "-tr", m["trainer"], "-p", m["plans"], "-device", device, "-npp", steps.n_proc,
              "-nps", steps.n_proc, total=len(held_out), progress=count_files(predictions, f"*{ending}"), unit="case")
    steps.run(f"{k}: evaluate the predictions", fresh, "nnUNetv2_evaluate_folder", str(labels), str(predictions),
              "-djfile", str(predictions / "dataset.json"), "-pfile", str(predictions / "plans.json"),
              "-np", steps.n_proc)
    return predictions / "summary.json"


def run_setting(steps: Steps, setting: Setting, scale: SettingScale, device: str, output: Path) -> dict:
    """Build, plan, preprocess, train, predict and evaluate one setting; returns its part of summary.json."""
    k = setting.key
    _build_dataset(steps, setting, scale.data)
    # the builders check what they write (geometry, label values): no --verify_dataset_integrity
    trained = train_models(steps, setting.dataset_id, scale.budget, setting.models, device, verify=False,
                           prefix=f"{k}: ")
    dataset_json = trained.dataset_json
    tags = dataset_json.get("moe_nnunet", {}).get("case_modality")
    held_out = held_out_cases(steps.pre / trained.dataset, 0)
    names = {str(v): n for n, v in dataset_json["labels"].items()}
    out = output / k
    out.mkdir(parents=True, exist_ok=True)
    budget = scale.budget
    plot_curves(trained.curves, budget.epoch_iterations,
                f"{trained.dataset}, {CONFIGURATION}: {budget.iterations} iterations per model, batch "
                f"{budget.batch_size}, patch {'x'.join(map(str, trained.patch_size))}, widths <= "
                f"{budget.max_features}", out / "curves.png")
    models = {}
    for row, m in trained.models.items():
        c = trained.curves[row]
        models[row] = {**m, "validation": dice_summary(trained.folders[row] / "validation" / "summary.json", names,
                                                       tags),
                       "curve": {"pseudo_dice": [round(v, 4) for v in c["mean_fg_dice"]],
                                 "ema": [round(v, 4) for v in c["ema_fg_dice"]]}}
    result = {"dataset": trained.dataset, "data": setting.data, "title": setting.title, "held_out_cases": held_out,
              "labels": {n: v for n, v in dataset_json["labels"].items() if n != "background"},
              "channels": list(dataset_json["channel_names"].values()), "budget": trained.budget_json(),
              "curves": f"{k}/curves.png", "models": models}
    if tags:
        result["modalities"] = {c: tags[c] for c in held_out}

    if setting.missing_modality:
        report = evaluate_missing(steps, trained, out / "robustness", device, prefix=f"{k}: ")
        by_trainer = {m["trainer"]: row for row, m in trained.models.items()}
        result["missing_modality"] = {by_trainer[t]: r for t, r in report["results"].items()}
    else:
        stock = _predict_held_out(steps, setting, trained, held_out, device, out)
        result["models"]["M4oE"]["nnUNetv2_predict"] = dice_summary(stock, names, tags)
    result["headline"] = headline(result)

    folders = {row: f.parent for row, f in trained.folders.items()}
    report_dir = out / "report"
    extra = ["--robustness", str(out / "robustness" / "robustness.json")] if setting.missing_modality else []
    steps.run(f"{k}: HTML report", (report_dir / "report.html").is_file(), "moe_nnunet", "report",
              str(folders["M4oE"]), "--baseline", *[str(f) for r, f in folders.items() if r != "M4oE"],
              "-o", str(report_dir), *extra)
    result["report"] = str((report_dir / "report.html").relative_to(output))
    return result


def run_demo(output: Path, device: str = "cpu", fresh: bool = False, quick: bool = False,
             settings: tuple[str, ...] = tuple(s.key for s in SETTINGS)) -> dict:
    """Run the chosen settings in `output`; write summary.json and report.html there; return the summary."""
    from moe_nnunet.evaluation.report import versions, write_demo_overview

    if fresh and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else device
    scale = json.loads(json.dumps(scale_json(mode)))
    start = time.time()
    summary_file, mode_file = output / "summary.json", output / "demo_mode.json"
    earlier = json.loads(mode_file.read_text()) if mode_file.is_file() else {"mode": mode, "scale": scale}
    if earlier != {"mode": mode, "scale": scale}:  # datasets and budgets differ: never mix their steps
        raise SystemExit(f"[demo] {output} holds a demo run in mode {earlier.get('mode')!r} at other sizes or budgets "
                         f"than mode {mode!r} now: add --fresh to start over, or choose another --output")
    mode_file.write_text(json.dumps({"mode": mode, "scale": scale}, indent=1))
    steps = Steps(output / "logs", output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results",
                  "demo")
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    results, skipped = {}, {}
    for setting in (s for s in SETTINGS if s.key in settings):
        print(f"[demo] === {setting.key}: {setting.title} ===", flush=True)
        try:
            results[setting.key] = run_setting(steps, setting, SCALES[mode][setting.key], device, output)
        except DataUnavailable as e:
            skipped[setting.key] = str(e)
            print(f"[demo] {setting.key} skipped: {e}", flush=True)
    iterations = sorted({s.budget.iterations for s in SCALES[mode].values()})
    summary = {"mode": mode, "device": device, "configuration": CONFIGURATION, "fold": 0,
               "note": NOTES[mode].format(iterations=" or ".join(map(str, iterations))),
               "plateau_rule": PLATEAU_RULE, "settings": results, "skipped": skipped,
               "step_seconds": {**previous.get("step_seconds", {}), **steps.seconds},
               "run_seconds": round(time.time() - start, 1), "versions": versions(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    summary["steps_total_seconds"] = round(sum(summary["step_seconds"].values()), 1)  # earlier runs included
    summary_file.write_text(json.dumps(summary, indent=2))
    page = write_demo_overview(summary, output / "report.html")
    print(demo_table(summary))
    print(f"[demo] finished in {summary['run_seconds'] / 60:.1f} min (all steps, earlier runs included: "
          f"{summary['steps_total_seconds'] / 60:.1f} min); open {page} (summary: {summary_file})")
    return summary
