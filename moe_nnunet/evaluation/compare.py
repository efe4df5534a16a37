"""`moe_nnunet compare`: nnU-Net, nnU-Net with channel dropout and M4oE trained to a plateau with equal budgets.

For one dataset and nnU-Net's 2d configuration (`moe_nnunet.evaluation.equal_budget.train_models`): the stock
planning and preprocessing, `moe_nnunet plan`, then narrowed plans written for every model alike (features per
stage capped, one batch size, the same patch and the iteration budget); fold 0 of each model trained in turn by the
stock `nnUNetv2_train`; the per-epoch validation pseudo-Dice read from each checkpoint's log, plotted (`curves.png`)
and judged by `plateau_verdict`; then the held-out cases predicted with the full input and with each modality
removed (`moe_nnunet robustness`). Writes `comparison.json`, `comparison.md` and `curves.png`.

Every step is reused when its output exists; a stopped training continues with `--c`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from moe_nnunet.datasets import DATASETS
from moe_nnunet.evaluation.curves import PLATEAU_RULE, plateau_verdict, plot_curves, read_curves, verdict_words
from moe_nnunet.evaluation.equal_budget import (CONFIGURATION, MODELS, Budget, CompareError, Trained,
                                                compare_plans, evaluate_missing, train_models, write_compare_plans)
from moe_nnunet.evaluation.robustness import robustness_table
from moe_nnunet.workflow.steps import Steps

__all__ = ["MODELS", "CompareError", "Budget", "plateau_verdict", "compare_plans", "write_compare_plans",
           "read_curves", "plot_curves", "comparison_table", "run_compare"]


# --------------------------------------------------------------------------------------------------- table


def comparison_table(report: dict) -> str:
    """Markdown: the models (budget, speed, plateau), mean Dice with each modality removed, then per label."""
    s = report["schedule"]
    lines = [f"# Converged comparison on {report['dataset']} ({CONFIGURATION}, fold {report['fold']})", "",
             f"Every model: {s['num_epochs']} epochs x {s['num_iterations_per_epoch']} iterations = "
             f"{s['iterations']} iterations at batch {report['batch_size']}, patch "
             f"{'x'.join(map(str, report['patch_size']))}, widths capped at {report['max_features']} features, "
             f"validation pseudo-Dice from {s['num_val_iterations_per_epoch']} batch(es) per epoch, "
             f"device {report['device']}. "
             f"Plateau rule: {PLATEAU_RULE}.", "",
             "| model | trainer | plans | parameters | s / iteration | epochs | pseudo-Dice (last 25 %) | "
             "rise over the 25 % before | plateau |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for model, m in report["models"].items():
        v = m["plateau"]
        fmt = (lambda x: "" if x is None else f"{x:.3f}")
        lines.append(f"| {model} | `{m['trainer']}` | `{m['plans']}` | {m['parameters']:,} | "
                     f"{m['seconds_per_iteration']:.3f} | {m['epochs']} | {fmt(v['last_quarter'])} | "
                     f"{fmt(v['rise'])} | {verdict_words(v)} |")
    results = report["robustness"]["results"]
    conditions = list(next(iter(results.values())))
    lines += ["", f"Mean Dice on the {len(report['held_out_cases'])} held-out cases, full input and each modality "
                  f"removed (M4oE masks the expert, the others get the channel zero-filled):", "",
              "| model | " + " | ".join(conditions) + " |", "|---|" + "---:|" * len(conditions)]
    for model, m in report["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{results[m['trainer']][c]['mean']:.3f}" for c in conditions)
                     + " |")
    sanity = report.get("sanity")
    if sanity:
        within = "within" if sanity["within_1_point"] else "NOT within"
        lines += ["", f"Sanity: M4oE with one expert over all channels and no dropout, full input "
                      f"{sanity['one_expert']:.3f} vs nnU-Net {sanity['nnunet']:.3f}: "
                      f"{sanity['difference_points']:+.1f} points ({within} 1 point)."]
    lines += ["", "Per label (columns are trainers):", "", robustness_table(report["robustness"]).strip()]
    return "\n".join(lines) + "\n"


def _folders(dataset: str, output: Path, num_cases: int | None) -> tuple[Path, Path, Path, Path]:
    """(raw dataset folder, nnUNet_raw, nnUNet_preprocessed, nnUNet_results). A registered builder name is built
    into OUT/nnUNet_raw with nnU-Net's other folders beside it; a dataset id or name is looked up in the folders
    of the environment variables, as for nnU-Net's own commands."""
    from moe_nnunet.datasets import build_dataset

    if dataset in DATASETS:
        raw, pre, res = output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results"
        dataset_id = DATASETS[dataset].default_id
        found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
        if not found:
            print(f"[compare] building {dataset} into {raw} ...", flush=True)
            found = [build_dataset(dataset, dataset_id, raw, **({"num_cases": num_cases} if num_cases else {}))]
        elif num_cases and json.loads((found[0] / "dataset.json").read_text())["numTraining"] != num_cases:
            raise CompareError(f"{found[0]} was built with another --num_cases; use another -o")
        return found[0], raw, pre, res
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing:
        raise CompareError(f"-d {dataset} is not a registered builder name, so it is an nnU-Net dataset, and "
                           f"{', '.join(missing)} must be set as for nnU-Net (builders: {', '.join(DATASETS)})")
    raw = Path(os.environ["nnUNet_raw"])
    pattern = f"Dataset{int(dataset):03d}_*" if dataset.isdigit() else dataset
    found = sorted(p for p in raw.glob(pattern) if (p / "dataset.json").is_file())
    if len(found) != 1:
        raise CompareError(f"no single dataset {dataset!r} in {raw} (found {[p.name for p in found]})")
    return found[0], raw, Path(os.environ["nnUNet_preprocessed"]), Path(os.environ["nnUNet_results"])


def run_compare(dataset: str, output: str | os.PathLike, iterations: int = 800, epoch_iterations: int = 20,
                val_iterations: int = 5, max_features: int = 64, batch_size: int = 12, device: str = "cpu",
                num_cases: int | None = None, models: list[str] | None = None) -> dict:
    """Plan, train the `models` (row names of `MODELS`, default all) on fold 0 with one budget, evaluate with each
    modality removed, and write comparison.json, comparison.md and curves.png into `output`; returns the
    report."""
    budget = Budget(iterations, epoch_iterations, val_iterations, max_features, batch_size)
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    folder, raw, pre, res = _folders(dataset, output, num_cases)
    steps = Steps(output / "logs", raw, pre, res, "compare")
    # a builder's dataset was checked when it was written (geometry, label values)
    trained = train_models(steps, folder.name[len("Dataset"):len("Dataset") + 3], budget, models, device=device,
                           verify=dataset not in DATASETS)
    robustness = evaluate_missing(steps, trained, output / "robustness", device)
    return _write_report(output, trained, device, robustness, steps.seconds)


def _write_report(output: Path, trained: Trained, device: str, robustness: dict, seconds: dict) -> dict:
    import datetime

    previous = output / "comparison.json"
    if previous.is_file():  # the times of steps reused from an earlier run
        seconds = {**json.loads(previous.read_text()).get("step_seconds", {}), **seconds}
    models, budget = trained.models, trained.budget
    full = {m: robustness["results"][v["trainer"]]["full input"]["mean"] for m, v in models.items()}
    nnunet, one = full.get(MODELS[0][0]), full.get(MODELS[3][0])
    sanity = None if nnunet is None or one is None else {
        "nnunet": nnunet, "one_expert": one, "difference_points": round(100 * (one - nnunet), 2),
        "within_1_point": abs(one - nnunet) <= 0.01}
    report = {"dataset": trained.dataset, "configuration": CONFIGURATION, "fold": 0, "device": device,
              "description": trained.dataset_json.get("description", ""),
              "schedule": {**budget.schedule, "iterations": budget.iterations}, "batch_size": budget.batch_size,
              "max_features": budget.max_features, "patch_size": trained.patch_size,
              "held_out_cases": robustness["held_out_cases"], "plateau_rule": PLATEAU_RULE, "models": models,
              "sanity": sanity,
              "robustness": robustness, "curves": trained.curves, "step_seconds": seconds,
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    (output / "comparison.json").write_text(json.dumps(report, indent=1))
    (output / "comparison.md").write_text(comparison_table(report))
    plot_curves(trained.curves, budget.epoch_iterations,
                f"{trained.dataset}, {CONFIGURATION}: {budget.iterations} iterations per model, batch "
                f"{budget.batch_size}, widths <= {budget.max_features}", output / "curves.png")
    return report
