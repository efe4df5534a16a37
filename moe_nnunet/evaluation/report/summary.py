"""`make_report`: the figures of summary.json (Dice per label and case, gate statistics, training time), then
the report's PNGs and report.html."""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_nnunet.evaluation.report.figures import draw_figures
from moe_nnunet.evaluation.report.html_page import render_html
from moe_nnunet.evaluation.report.model import Model, load_model

__all__ = ["make_report", "dice_stats", "per_case", "gate_stats", "training_stats", "versions"]


def _num(x) -> float | None:
    return None if x is None or math.isnan(float(x)) else float(x)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.array([np.nan if v is None else v for v in values], dtype=float)
    if np.all(np.isnan(a)):
        return float("nan"), float("nan")
    return float(np.nanmean(a)), float(np.nanstd(a))


def dice_stats(model: Model) -> tuple[dict, dict]:
    """Per label {"value", "mean", "std", "per_fold"}, and the same for the foreground mean."""
    out = {}
    for key, name in model.labels.items():
        per_fold = [f.summary["mean"].get(key, {}).get("Dice") for f in model.folds]
        mean, std = _mean_std(per_fold)
        out[name] = {"value": key, "mean": _num(mean), "std": _num(std), "per_fold": [_num(v) for v in per_fold]}
    per_fold = [f.summary["foreground_mean"]["Dice"] for f in model.folds]
    mean, std = _mean_std(per_fold)
    return out, {"mean": _num(mean), "std": _num(std), "per_fold": [_num(v) for v in per_fold]}


def _case_id(model: Model, file: str) -> str:
    name, ending = Path(file).name, model.dataset_json.get("file_ending", ".nii.gz")
    return name[:-len(ending)] if name.endswith(ending) else name


def per_case(model: Model) -> dict[str, dict]:
    """case id -> {"fold", "dice": {label: Dice}, "mean": mean over labels present}."""
    cases = {}
    for f in model.folds:
        for entry in f.summary["metric_per_case"]:
            dice = {n: _num(entry["metrics"].get(k, {}).get("Dice")) for k, n in model.labels.items()}
            present = [v for v in dice.values() if v is not None]
            cases[_case_id(model, entry["prediction_file"])] = {
                "fold": f.name, "dice": dice, "mean": _num(np.mean(present)) if present else None,
                "prediction_file": entry["prediction_file"], "reference_file": entry["reference_file"]}
    return cases


def _mean_tree(items: list):
    """Element-wise mean of equally shaped gate summaries (nested dicts / lists of floats)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_tree([it[k] for it in items]) for k in first if all(k in it for it in items)}
    if isinstance(first, list) and first and isinstance(first[0], str):
        return first
    return np.round(np.mean(np.asarray(items, dtype=float), axis=0), 4).tolist()


def gate_stats(model: Model, cases: dict) -> dict | None:
    """Gate history per epoch (averaged over folds), its last epoch, and the validation cases; None without a gate."""
    histories = [f.logging.get("moe_gate_weights") or [] for f in model.folds]
    epochs = []
    for i in range(max(len(h) for h in histories)):
        entries = [h[i] for h in histories if i < len(h) and h[i] and "mean" in h[i]]
        if entries:
            epochs.append((i, _mean_tree(entries)))
    val_cases = {c: {"fold": f.name, **v} for f in model.folds for c, v in f.gate_cases.items()}
    if not epochs and not val_cases:
        return None
    experts = epochs[-1][1]["experts"] if epochs else next(f.gate_experts for f in model.folds if f.gate_cases)
    return {"experts": experts, "history": epochs, "last_epoch": epochs[-1][1] if epochs else None,
            "last_epoch_index": epochs[-1][0] if epochs else None,
            "validation_cases": {c: {**v, "dice": cases.get(c, {}).get("mean")} for c, v in sorted(val_cases.items())}}


def training_stats(model: Model) -> dict:
    """Epochs and wall time (sum of epoch durations from nnU-Net's timestamps) per fold and overall."""
    per_fold = {}
    for f in model.folds:
        start, end = f.logging.get("epoch_start_timestamps", []), f.logging.get("epoch_end_timestamps", [])
        n = min(len(start), len(end))
        per_fold[f.name] = {"epochs": n, "wall_time_s": round(float(sum(e - s for s, e in zip(start[:n], end[:n]))), 1)}
    return {"epochs": max((v["epochs"] for v in per_fold.values()), default=0),
            "wall_time_s": round(sum(v["wall_time_s"] for v in per_fold.values()), 1), "per_fold": per_fold}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import moe_nnunet
    try:
        nnunet = version("nnunetv2")
    except PackageNotFoundError:
        nnunet = "not installed"
    return {"moe_nnunet": moe_nnunet.__version__, "nnunetv2": nnunet, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------- report

def _titles(models: list[Model]) -> None:
    """Column titles: the trainer name, or more of the folder name where trainers repeat."""
    trainers = [m.trainer for m in models]
    for m in models:
        m.title = m.trainer if trainers.count(m.trainer) == 1 else m.path.name
    seen: set[str] = set()
    for m in models:  # the same folder given twice
        while m.title in seen:
            m.title += " (again)"
        seen.add(m.title)


def make_report(results_folder: str | os.PathLike, output: str | os.PathLike | None = None,
                baselines: Sequence[str | os.PathLike] = (), robustness: str | os.PathLike | None = None) -> Path:
    """Write report.html, its PNGs and summary.json for a trained model folder; returns the path of report.html.

    Args:
        results_folder: `$nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>`.
        output: output folder (default `results_folder/report`).
        baselines: model folders of the same dataset to compare with.
        robustness: a `robustness.json` of `moe_nnunet robustness` for these models: adds the missing-modality table.
    """
    model = load_model(results_folder)
    others = [load_model(b) for b in baselines]
    for b in others:
        if b.dataset != model.dataset:
            raise ValueError(f"baseline {b.path} is trained on {b.dataset}, the model on {model.dataset}: "
                             f"compare models of the same dataset")
    _titles([model, *others])
    out = Path(output) if output is not None else model.path / "report"
    out.mkdir(parents=True, exist_ok=True)

    stats = {}
    for m in (model, *others):
        dice, mean_dice = dice_stats(m)
        stats[m.title] = {"model": _names(m), "dice": dice, "mean_dice": mean_dice, "per_case": per_case(m)}
    gate = gate_stats(model, stats[model.title]["per_case"])
    training = training_stats(model)
    figures = draw_figures(model, others, stats, gate, out)
    summary = {**_without_paths(stats[model.title]),
               "baselines": {b.title: _without_paths(stats[b.title]) for b in others},
               "gate": _gate_json(gate), "training": training, "versions": versions(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if robustness is not None:
        summary["missing_modality"] = _read_robustness(Path(robustness), model)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    page = out / "report.html"
    page.write_text(render_html(model, others, summary, figures), encoding="utf-8")
    return page


def _read_robustness(path: Path, model: Model) -> dict:
    """The missing-modality results of `moe_nnunet robustness` (robustness.json) for a model's dataset."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `moe_nnunet robustness -d ... -o FOLDER` first and give "
                                f"FOLDER/robustness.json")
    report = json.loads(path.read_text())
    if report.get("dataset") != model.dataset:
        raise ValueError(f"{path} is for {report.get('dataset')}, the model for {model.dataset}")
    return {"fold": report["fold"], "held_out_cases": report["held_out_cases"], "results": report["results"]}


def _names(m: Model) -> dict:
    return {"dataset": m.dataset, "trainer": m.trainer, "plans": m.plans, "configuration": m.configuration,
            "folds": [f.name for f in m.folds], "folder": str(m.path)}


def _without_paths(stats: dict) -> dict:
    cases = {c: {k: v for k, v in d.items() if not k.endswith("_file")} for c, d in stats["per_case"].items()}
    return {**stats, "per_case": cases}


def _gate_json(gate: dict | None) -> dict | None:
    if gate is None:
        return None
    return {"experts": gate["experts"], "last_epoch": gate["last_epoch"], "last_epoch_index": gate["last_epoch_index"],
            "mean_per_epoch": [h["mean"] for _, h in gate["history"]],
            "validation_cases": gate["validation_cases"]}
