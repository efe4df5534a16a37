"""A self-contained HTML report for a trained nnU-Net model folder (M4oE or any other trainer).

`make_report` reads `$nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>` (its fold_N folders:
nnU-Net's validation summary, the checkpoint's training log, M4oE's gate statistics) and writes
`report.html` with its PNGs and `summary.json`. Baseline model folders of the same dataset go side by side.
Sections are rendered only from what exists, so a plain nnUNetTrainer folder (no gate) works too.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["make_report", "load_model", "missing_modality_html", "write_demo_overview"]

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
MAX_OVERLAY_CASES = 3
# label colours: strong, distinguishable on grey (matplotlib's tab10 without its grey)
LABEL_COLORS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#8c564b")


@dataclass
class Fold:
    name: str                 # "0", "1", ... or "all"
    path: Path
    summary: dict             # validation/summary.json
    logging: dict             # nnU-Net's logger dict from the checkpoint ({} without one)
    gate_cases: dict          # gate_weights_validation.json "cases" ({} for trainers without a gate)
    gate_experts: list        # its "experts"


@dataclass
class Model:
    path: Path
    dataset: str
    trainer: str
    plans: str
    configuration: str
    dataset_json: dict
    folds: list[Fold]
    notes: list[str] = field(default_factory=list)
    title: str = ""           # column title in the report

    @property
    def fold_names(self) -> str:
        return ", ".join(f.name for f in self.folds)

    @property
    def labels(self) -> dict[str, str]:
        """nnU-Net's summary key (str(value) or str(region tuple)) -> label name, background excluded."""
        keys = {}
        for name, value in self.dataset_json["labels"].items():
            key = str(value) if isinstance(value, int) else str(tuple(value))
            if key != "0":
                keys[key] = name
        return keys

    @property
    def value_names(self) -> dict[int, str]:
        """Integer value in exported segmentations -> label name."""
        order = self.dataset_json.get("regions_class_order")
        if order:  # region-based training exports label maps with these values
            return dict(zip(order, self.labels.values()))
        return {int(k): n for k, n in self.labels.items()}


# ---------------------------------------------------------------------------------------------------- loading

def _load_logging(fold_dir: Path) -> dict:
    from moe_nnunet.trainers.checkpointing import load_checkpoint_file
    for name in CHECKPOINTS:
        if (fold_dir / name).is_file():
            ckpt = load_checkpoint_file(fold_dir / name, map_location="cpu", mmap=True)
            return ckpt.get("logging", {}) or {}
    return {}


def load_model(folder: str | os.PathLike) -> Model:
    """Read a trained model folder; raises FileNotFoundError / ValueError with what to do about it."""
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a trained model folder such as "
                                f"$nnUNet_results/Dataset001_Name/nnUNetTrainer__nnUNetPlans__3d_fullres")
    parts = path.name.split("__")
    if len(parts) != 3:
        raise ValueError(f"{path.name} is not named <Trainer>__<Plans>__<configuration> like nnU-Net's model folders; "
                         f"give the folder inside $nnUNet_results/DatasetXXX_Name/")
    fold_dirs = sorted((p for p in path.glob("fold_*") if p.is_dir()),
                       key=lambda p: (not p.name[5:].isdigit(), int(p.name[5:]) if p.name[5:].isdigit() else 0))
    if not fold_dirs:
        raise FileNotFoundError(f"{path} holds no fold_N folders: train first (nnUNetv2_train {path.parent.name} "
                                f"{parts[2]} 0 -tr {parts[0]} -p {parts[1]})")
    if not (path / "dataset.json").is_file():
        raise FileNotFoundError(f"{path} has no dataset.json; nnUNetv2_train writes it when training starts")
    folds, notes = [], []
    for d in fold_dirs:
        summary_file = d / "validation" / "summary.json"
        if not summary_file.is_file():
            notes.append(f"{d.name} left out: no validation/summary.json yet (finish training, or run "
                         f"nnUNetv2_train {path.parent.name} {parts[2]} {d.name[5:]} -tr {parts[0]} -p {parts[1]} --val)")
            continue
        gate_file = d / "gate_weights_validation.json"
        gate = json.loads(gate_file.read_text()) if gate_file.is_file() else {"cases": {}, "experts": []}
        folds.append(Fold(d.name[5:], d, json.loads(summary_file.read_text()), _load_logging(d), gate["cases"],
                          gate["experts"]))
    if not folds:
        found = ", ".join(d.name for d in fold_dirs)
        raise FileNotFoundError(f"no fold of {path} ({found}) has validation/summary.json, nnU-Net's evaluation of "
                                f"the held-out cases: let training finish, or validate a trained fold with "
                                f"nnUNetv2_train {path.parent.name} {parts[2]} {fold_dirs[0].name[5:]} -tr {parts[0]} "
                                f"-p {parts[1]} --val")
    return Model(path, path.parent.name, parts[0], parts[1], parts[2],
                 json.loads((path / "dataset.json").read_text()), folds, notes)


# ---------------------------------------------------------------------------------------------------- statistics

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
    figures = _draw_figures(model, others, stats, gate, out)
    summary = {**_without_paths(stats[model.title]),
               "baselines": {b.title: _without_paths(stats[b.title]) for b in others},
               "gate": _gate_json(gate), "training": training, "versions": versions(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if robustness is not None:
        summary["missing_modality"] = _read_robustness(Path(robustness), model)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    page = out / "report.html"
    page.write_text(_render_html(model, others, summary, figures), encoding="utf-8")
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


# ---------------------------------------------------------------------------------------------------- figures

def _draw_figures(model: Model, others: list[Model], stats: dict, gate: dict | None, out: Path) -> dict:
    """Write the report's PNGs into `out`; returns what was drawn (file names and the overlay cases)."""
    from matplotlib import style

    figures: dict = {"progress": _copy_progress(model, out)}
    with style.context("default"):  # independent of the seaborn style nnU-Net's progress plot sets
        if gate and gate["history"]:
            figures["gate_epochs"] = _save(_plot_gate_epochs(gate), out / "gate_epochs.png")
            figures["gate_groups"] = _save(_plot_gate_groups(gate), out / "gate_last_epoch.png")
        if gate and gate["validation_cases"]:
            figures["gate_cases"] = _save(_plot_gate_cases(gate), out / "gate_validation_cases.png")
        rows = _overlay_rows(model, others, stats)
        if rows:
            figures["overlays"] = _save(_plot_overlays(model, others, rows), out / "overlays.png")
            figures["overlay_cases"] = [(r["case"], r["role"], r["dice"]) for r in rows]
            figures["overlay_background"] = rows[0]["background"]
    return figures


def _save(fig, path: Path, dpi: int = 90) -> str:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path.name


def _copy_progress(model: Model, out: Path) -> list[tuple[str, str]]:
    copied = []
    for f in model.folds:
        if (f.path / "progress.png").is_file():
            shutil.copyfile(f.path / "progress.png", out / f"progress_fold_{f.name}.png")
            copied.append((f.name, f"progress_fold_{f.name}.png"))
    return copied


def _expert_colors(n: int) -> list:
    from matplotlib import colormaps
    return [colormaps["tab10"](i % 10) for i in range(n)]


def _plot_gate_epochs(gate: dict):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    experts, history = gate["experts"], gate["history"]
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    x = [i for i, _ in history]
    marker = "o" if len(x) <= 30 else None
    for e, (name, color) in enumerate(zip(experts, _expert_colors(len(experts)))):
        ax.plot(x, [h["mean"][e] for _, h in history], color=color, lw=2.2, marker=marker, ms=4, label=name)
    ax.axhline(1 / len(experts), color="0.4", lw=1, ls="--", label="even split")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="mean gate weight", ylim=(0, 1))
    ax.set_title("Gate weight per expert during training (mean over scales and voxels)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _stacked_bars(ax, rows: list[str], values: np.ndarray, experts: list[str], separators: Sequence[int] = ()) -> None:
    """Horizontal bars, one per row, split into the experts' shares (values: (R, E), rows sum to 1)."""
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for e, (name, color) in enumerate(zip(experts, _expert_colors(len(experts)))):
        ax.barh(y, values[:, e], left=left, color=color, label=name, height=0.75, edgecolor="white", lw=0.5)
        if len(rows) <= 40:
            for yi, (l, v) in enumerate(zip(left, values[:, e])):
                if v >= 0.12:
                    ax.text(l + v / 2, yi, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white")
        left += values[:, e]
    for k in range(1, len(experts)):
        ax.axvline(k / len(experts), color="0.15", lw=0.9, ls="--")
    for s in separators:
        ax.axhline(s - 0.5, color="0.6", lw=0.8)
    ax.set_yticks(y, rows if len(rows) <= 40 else [], fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=9, ncol=len(experts), loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)


def _plot_gate_groups(gate: dict):
    from matplotlib.figure import Figure

    last = gate["history"][-1][1]
    rows, values, separators = ["all scales"], [last["mean"]], []
    n_scales = len(last.get("per_scale", []))
    for s, w in enumerate(last.get("per_scale", [])):
        rows.append("scale 1 (full resolution)" if s == 0 else f"scale {s + 1}" + (" (coarsest)" if s == n_scales - 1 else ""))
        values.append(w)
    for group, fmt in (("per_label", "label: {}"), ("per_modality", "{} cases")):
        if last.get(group):
            separators.append(len(rows))
            rows += [fmt.format(k) for k in last[group]]
            values += list(last[group].values())
    fig = Figure(figsize=(7.5, 0.34 * len(rows) + 1.4))
    ax = fig.subplots()
    _stacked_bars(ax, rows, np.asarray(values, dtype=float), gate["experts"], [1, *separators])
    ax.set_xlabel(f"share of the gate weight (epoch {gate['history'][-1][0]}, last recorded)")
    return fig


def _plot_gate_cases(gate: dict):
    from matplotlib.figure import Figure

    cases = gate["validation_cases"]
    order = sorted(cases, key=lambda c: (cases[c]["dice"] is None, -(cases[c]["dice"] or 0), c))
    rows = [c if cases[c]["dice"] is None else f"{c}  (Dice {cases[c]['dice']:.2f})" for c in order]
    fig = Figure(figsize=(7.5, min(0.3 * len(rows), 14) + 1.2))
    ax = fig.subplots()
    _stacked_bars(ax, rows, np.asarray([cases[c]["mean"] for c in order], dtype=float), gate["experts"])
    ax.set_xlabel("share of the gate weight (mean over scales and sliding-window patches)")
    if len(rows) > 40:
        ax.set_ylabel(f"{len(rows)} validation cases, best mean Dice at the top")
    return fig


# ---------------------------------------------------------------------------------------------------- overlays

def _read(path: Path | None):
    """An image as a numpy array, 3D images reoriented so that array[k] is an axial slice in radiological view
    (anterior up, patient's right on the left); returns (array, in-plane aspect) or None."""
    import SimpleITK as sitk

    if path is None or not Path(path).is_file():
        return None
    img = sitk.ReadImage(str(path))
    if img.GetDimension() == 3:
        img = sitk.DICOMOrient(img, "LPS")
    arr = sitk.GetArrayFromImage(img)
    spacing = img.GetSpacing()
    return (arr if arr.ndim == 3 else arr[None]), spacing[1] / spacing[0]


def _first_file(*candidates) -> Path | None:
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _overlay_rows(model: Model, others: list[Model], stats: dict) -> list[dict]:
    """Up to three cases (median, worst and best mean Dice) with their slice and the panels' arrays."""
    cases = stats[model.title]["per_case"]
    ranked = sorted((c for c in cases if cases[c]["mean"] is not None), key=lambda c: cases[c]["mean"])
    if not ranked:
        return []
    roles: dict[str, list[str]] = {}
    for role, case in (("median", ranked[(len(ranked) - 1) // 2]), ("worst", ranked[0]), ("best", ranked[-1])):
        roles.setdefault(case, []).append(role)
    raw = Path(os.environ.get("nnUNet_raw", "/nonexistent")) / model.dataset
    pre = Path(os.environ.get("nnUNet_preprocessed", "/nonexistent")) / model.dataset
    ending = model.dataset_json.get("file_ending", ".nii.gz")
    rows = []
    for case, role in list(roles.items())[:MAX_OVERLAY_CASES]:
        entry, name = cases[case], case + ending
        ref = _read(_first_file(entry["reference_file"], pre / "gt_segmentations" / name, raw / "labelsTr" / name))
        if ref is None:
            continue
        fold_dir = model.path / f"fold_{entry['fold']}" / "validation"
        preds = [_read(_first_file(fold_dir / name, entry["prediction_file"]))]
        for b in others:
            bc = stats[b.title]["per_case"].get(case)
            preds.append(_read(b.path / f"fold_{bc['fold']}" / "validation" / name) if bc else None)
        channels = {n: _read(raw / "imagesTr" / f"{case}_{int(i):04d}{ending}")
                    for i, n in model.dataset_json["channel_names"].items()}
        k = int(np.argmax((ref[0] > 0).reshape(len(ref[0]), -1).sum(1)))  # axial slice with the most foreground
        rows.append({"case": case, "role": " and ".join(role), "dice": entry["mean"], "slice": k, "aspect": ref[1],
                     "reference": ref[0][k], "predictions": [p[0][k] if p else None for p in preds],
                     "pred_dice": [entry["mean"]] + [stats[b.title]["per_case"].get(case, {}).get("mean")
                                                     for b in others],
                     "channels": {n: (c[0][k] if c else None) for n, c in channels.items()},
                     "background": next((n for n, c in channels.items() if c), None)})
    return rows


def _grey(ax, image: np.ndarray | None, shape, aspect: float) -> None:
    if image is None:
        ax.imshow(np.zeros(shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        return
    lo, hi = np.percentile(image, (0.5, 99.5))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")


def _panel_title(title: str, width: int = 16) -> str:
    """A model name on short lines, so that neighbouring panel titles do not run into each other."""
    lines = []
    for part in title.split("__"):
        if len(part) > width and part.startswith("nnUNetTrainer"):
            lines += ["nnUNetTrainer", part[len("nnUNetTrainer"):]]
        else:
            lines += [part[i:i + width + 4] for i in range(0, len(part), width + 4)]
    return "\n".join(lines)


def _plot_overlays(model: Model, others: list[Model], rows: list[dict]):
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = model.value_names
    colors = {v: to_rgba(LABEL_COLORS[i % len(LABEL_COLORS)]) for i, v in enumerate(values)}
    channel_names = list(model.dataset_json["channel_names"].values())
    titles = channel_names + ["reference"] + [_panel_title(m.title) for m in (model, *others)]
    fig = Figure(figsize=(2.0 * len(titles), 2.25 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for r, row in enumerate(rows):
        shape, aspect = row["reference"].shape, row["aspect"]
        background = row["channels"].get(row["background"])
        segs = [row["reference"], *row["predictions"]]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(channel_names):
                _grey(ax, row["channels"][channel_names[c]], shape, aspect)
                if row["channels"][channel_names[c]] is None:
                    ax.text(0.5, 0.5, "image not found\nunder $nnUNet_raw", transform=ax.transAxes, ha="center",
                            va="center", color="0.85", fontsize=8)
                continue
            seg = segs[c - len(channel_names)]
            if seg is None:  # the case is not in this baseline's validation folds
                _grey(ax, None, shape, aspect)
                ax.text(0.5, 0.5, "not among this\nmodel's validation\ncases", transform=ax.transAxes, ha="center",
                        va="center", color="0.85", fontsize=8)
                continue
            _grey(ax, background, shape, aspect)
            rgba = np.zeros((*shape, 4))
            for v, color in colors.items():
                rgba[seg == v] = (*color[:3], 0.6)
            ax.imshow(rgba, aspect=aspect, interpolation="nearest")
            dice = row["pred_dice"][c - len(channel_names) - 1] if c > len(channel_names) else None
            if dice is not None:
                ax.set_xlabel(f"mean Dice {dice:.2f}", fontsize=9)
        axes[r, 0].set_ylabel(f"{row['case']}\n{row['role']}, slice {row['slice']}", fontsize=9)
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=10)
    handles = [Patch(color=colors[v], label=n) for v, n in values.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0))
    fig.subplots_adjust(bottom=0.5 / (2.25 * len(rows) + 0.6) + 0.02, wspace=0.05, hspace=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------- HTML

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1100px;margin:2em auto;
padding:0 1.2em;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.02em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{padding:.25em .7em;border-bottom:1px solid #e4e4e4;text-align:right} th{background:#f6f6f6}
td:first-child,th:first-child{text-align:left} tr.total td{border-top:2px solid #bbb}
.meta td{text-align:left;border:none;padding:.1em 1em .1em 0} .meta td:first-child{color:#666}
.how{color:#555;font-size:.93em;max-width:52em} .note{background:#fff8e0;border-left:3px solid #e0b000;padding:.4em .8em}
img{max-width:100%;height:auto} figure{margin:1em 0} small{color:#666;font-weight:normal}
.progress{display:flex;flex-wrap:wrap;gap:1.5em} .progress figure{width:min(100%,520px);margin:0}
details{margin:.8em 0} .wide{overflow-x:auto} summary{cursor:pointer;color:#245} td.lab{text-align:left}
"""
# lets a browser check (and a reader's devtools) tell whether every image loaded
IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesOk = String(imgs.every(function (i) { return i.complete && i.naturalWidth > 0; }));
  document.body.dataset.imagesCount = String(imgs.length);
});
</script>"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(mean, std=None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _img(src: str, alt: str, how: str) -> str:
    return f'<figure><img src="{_e(src)}" alt="{_e(alt)}"><figcaption class="how">{how}</figcaption></figure>'


def _render_html(model: Model, others: list[Model], summary: dict, figures: dict) -> str:
    parts = [_header_html(model, summary), _dice_html(model, others, summary), _cases_html(model, others, summary)]
    if summary.get("missing_modality"):
        mm = summary["missing_modality"]
        parts.append("<h2>A modality missing</h2>\n" + missing_modality_html(mm["results"], len(mm["held_out_cases"]),
                                                                            mm["fold"]))
    if summary["gate"]:
        parts.append(_gate_html(summary, figures))
    if "overlays" in figures:
        parts.append(_overlay_html(figures))
    if figures["progress"]:
        parts.append(_progress_html(figures))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(model.dataset)} – '
            f'{_e(model.trainer)}</title><style>{STYLE}</style>\n{IMAGE_CHECK}</head>\n<body>\n'
            + "\n".join(parts) + "\n</body></html>\n")


def _header_html(model: Model, summary: dict) -> str:
    t, v = summary["training"], summary["versions"]
    n_cases = len(summary["per_case"])
    minutes = f"{t['wall_time_s'] / 60:.1f} min" if t["wall_time_s"] >= 60 else f"{t['wall_time_s']:.0f} s"
    rows = [("dataset", model.dataset), ("trainer", model.trainer), ("plans", model.plans),
            ("configuration", model.configuration), ("folds", model.fold_names),
            ("validation cases", n_cases),
            ("training", f"{t['epochs']} epochs, {minutes} of epoch time" + (" (all folds)" if len(model.folds) > 1 else "")),
            ("versions", ", ".join(f"{k} {x}" for k, x in v.items())), ("written", summary["date"]),
            ("model folder", model.path)]
    meta = "".join(f"<tr><td>{_e(k)}</td><td>{_e(x)}</td></tr>" for k, x in rows)
    md = summary["mean_dice"]
    glance = (f"Mean foreground Dice <b>{_fmt(md['mean'])}</b> on {n_cases} held-out validation cases"
              f" (fold{'s' if len(model.folds) > 1 else ''} {_e(model.fold_names)}).")
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in model.notes)
    return (f"<h1>{_e(model.dataset)} <small>· {_e(model.trainer)}</small></h1>\n<p>{glance}</p>{notes}\n"
            f'<table class="meta">{meta}</table>')


def _bold_best(cells: list[tuple[float | None, str]]) -> list[str]:
    """Table cells with the highest value in bold (only when there is something to compare)."""
    known = [round(m, 3) for m, _ in cells if m is not None]
    best = max(known) if len(cells) > 1 and len(set(known)) > 1 else None  # ties are not bold
    return [f"<td><b>{text}</b></td>" if best is not None and m is not None and round(m, 3) == round(best, 3)
            else f"<td>{text}</td>" for m, text in cells]


def _dice_html(model: Model, others: list[Model], summary: dict) -> str:
    models = [(model, summary)] + [(b, summary["baselines"][b.title]) for b in others]
    head = "".join(f"<th>{_e(m.title)}<br><small>fold{'s' if len(m.folds) > 1 else ''} {_e(m.fold_names)}</small></th>"
                   for m, _ in models)
    body = []
    for name, d in summary["dice"].items():
        cells = [(s["dice"].get(name, {}).get("mean"), _fmt(s["dice"].get(name, {}).get("mean"),
                                                            s["dice"].get(name, {}).get("std") if len(m.folds) > 1 else None))
                 for m, s in models]
        body.append(f"<tr><td>{_e(name)} <small>({_e(d['value'])})</small></td>{''.join(_bold_best(cells))}</tr>")
    cells = [(s["mean_dice"]["mean"], _fmt(s["mean_dice"]["mean"], s["mean_dice"]["std"] if len(m.folds) > 1 else None))
             for m, s in models]
    body.append(f'<tr class="total"><td>mean (foreground)</td>{"".join(_bold_best(cells))}</tr>')
    how = ("Dice overlap of prediction and reference on each fold's held-out validation cases, from nnU-Net's own "
           "evaluation (<code>validation/summary.json</code>): 1 is perfect overlap, 0 none. With several folds: mean "
           "± standard deviation over folds.")
    if others:
        how += " Bold: the better model in each row (none where they are equal)."
        if len({m.fold_names for m, _ in models}) > 1:
            how += " <b>The models were validated on different folds, so the columns cover different cases.</b>"
    return (f"<h2>Dice per label</h2>\n<table><tr><th>label</th>{head}</tr>\n" + "\n".join(body)
            + f'</table>\n<p class="how">{how}</p>')


def _cases_html(model: Model, others: list[Model], summary: dict) -> str:
    models = [(model, summary)] + [(b, summary["baselines"][b.title]) for b in others]
    labels = list(summary["dice"]) + ["mean"]
    cases = summary["per_case"]
    order = sorted(cases, key=lambda c: (cases[c]["mean"] is None, cases[c]["mean"] or 0, c))
    key = ""
    if others:
        letters = [chr(ord("A") + i) for i in range(len(models))]
        key = "<p>" + " · ".join(f"<b>{x}</b>: {_e(m.title)}" for x, (m, _) in zip(letters, models)) + "</p>"
        head = ('<tr><th rowspan="2">case</th>' + "".join(f'<th colspan="{len(models)}">{_e(lb)}</th>' for lb in labels)
                + "</tr><tr>" + "".join(f'<th title="{_e(m.title)}">{x}</th>' for _ in labels
                                        for x, (m, _) in zip(letters, models)) + "</tr>")
    else:
        head = "<tr><th>case</th>" + "".join(f"<th>{_e(lb)}</th>" for lb in labels) + "</tr>"
    body = []
    for c in order:
        cells = []
        for lb in labels:
            vals = []
            for _, s in models:
                entry = s["per_case"].get(c)
                vals.append(None if entry is None else entry["mean"] if lb == "mean" else entry["dice"].get(lb))
            cells += _bold_best([(v, _fmt(v)) for v in vals])
        body.append(f"<tr><td>{_e(c)} <small>fold {_e(cases[c]['fold'])}</small></td>{''.join(cells)}</tr>")
    return (f"<details><summary>Dice per validation case ({len(cases)} cases, worst first)</summary>\n"
            f'{key}<div class="wide"><table>{head}\n' + "\n".join(body) + "</table></div>\n<p class=\"how\">– : the label is in neither the "
            "reference nor the prediction of that case (nnU-Net leaves Dice undefined).</p></details>")


def missing_modality_html(results: dict, num_cases: int, fold: int) -> str:
    """Table of `moe_nnunet robustness` results, {model: {condition: {"labels", "mean", "how"}}}: one row per
    condition and label, one column per model, the best per row in bold."""
    models = list(results)
    conditions = list(results[models[0]])
    labels = list(results[models[0]][conditions[0]]["labels"])
    head = "".join(f"<th>{_e(m)}</th>" for m in models)
    body = []
    for condition in conditions:
        how = "; ".join(sorted({f"{m}: {results[m][condition]['how']}" for m in models
                                if results[m][condition]["how"] != "complete"}))
        title = f'<td rowspan="{len(labels) + 1}" title="{_e(how)}"><b>{_e(condition)}</b></td>'
        for i, label in enumerate(labels + ["mean"]):
            values = [results[m][condition]["mean" if label == "mean" else "labels"] for m in models]
            values = [v if label == "mean" else v.get(label) for v in values]
            cls = ' class="total"' if label == "mean" else ""
            body.append(f"<tr{cls}>{title if i == 0 else ''}<td class=\"lab\">{_e(label)}</td>"
                        f"{''.join(_bold_best([(v, _fmt(v)) for v in values]))}</tr>")
    how = (f"Dice on the {num_cases} held-out cases of fold {fold}, predicted with the full input and with each "
           "modality removed in turn (<code>moe_nnunet robustness</code>, nnU-Net's own evaluation). M4oE models "
           "mask the missing modality's expert; nnU-Net's network gets the channel zero-filled after normalisation "
           "(trained for that with modality dropout, or not). A label seen only in the removed modality cannot be "
           "found by any model: compare the models per row. Bold: the best model in each row.")
    return (f'<table><tr><th>input</th><th>label</th>{head}</tr>\n' + "\n".join(body)
            + f'</table>\n<p class="how">{how}</p>')


def _gate_html(summary: dict, figures: dict) -> str:
    gate, parts = summary["gate"], ["<h2>Gate: which expert the model trusts</h2>"]
    experts = ", ".join(gate["experts"])
    parts.append(f'<p class="how">The model has one expert per modality ({_e(experts)}); at every voxel and scale a '
                 "gate gives each expert a weight, the weights summing to 1. A weight near 1 means the gate trusts that "
                 "expert for those voxels; the dashed line is an even split between the experts.</p>")
    if "gate_epochs" in figures:
        parts.append("<h3>During training</h3>")
        parts.append(_img(figures["gate_epochs"], "gate weight per expert over the epochs",
                          "Each line is one expert's mean weight over the training batches of an epoch"
                          + (", averaged over the folds" if len(summary["model"]["folds"]) > 1 else "")
                          + ". Lines drifting apart show the gate learning to prefer some modalities."))
        parts.append("<h3>Per scale and per label, at the end of training</h3>")
        parts.append(_img(figures["gate_groups"], "gate weight per scale and label at the last epoch",
                          "Each bar splits the gate weight among the experts at the last recorded epoch: over all "
                          "scales, at each scale of the network (scale 1 is full resolution), for the voxels of each "
                          "reference label (at full resolution) and, for datasets combining modalities, for the cases "
                          "of each modality. The dashed lines mark the even split."))
    if "gate_cases" in figures:
        parts.append("<h3>Per validation case</h3>")
        parts.append(_img(figures["gate_cases"], "gate weight per validation case",
                          "One bar per held-out validation case (from <code>gate_weights_validation.json</code>), "
                          "best mean Dice at the top: a case whose bar differs from the others is one the gate routed "
                          "differently, often worth a look at its images."))
    return "\n".join(parts)


def _overlay_html(figures: dict) -> str:
    cases = "; ".join(f"{_e(c)}: {_e(role)} mean Dice ({_fmt(d)})" for c, role, d in figures["overlay_cases"])
    background = figures.get("overlay_background")
    on = f" drawn on the {_e(background)} image" if background else " (raw images not found under $nnUNet_raw)"
    return ("<h2>Example segmentations</h2>\n" + _img("overlays.png", "input channels, reference and predictions",
            f"One row per validation case ({cases}), at the axial slice with the most reference foreground, in "
            f"radiological view (the patient's right on the left). Columns: each input channel, then the reference "
            f"and each model's prediction{on}, coloured by label as in the legend."))


def _progress_html(figures: dict) -> str:
    items = "".join(f'<figure><a href="{_e(src)}">{_img(src, f"training curves of fold {fold}", f"fold {_e(fold)}")}'
                    f"</a></figure>" for fold, src in figures["progress"])
    return ("<h2>Training curves (nnU-Net)</h2>\n<p class=\"how\">nnU-Net's <code>progress.png</code> of each fold "
            "(click to enlarge). Top: training loss (blue) and validation loss (red), with the pseudo Dice on the "
            "validation patches (green, dotted; solid: moving average). Middle: seconds per epoch. Bottom: learning "
            f'rate.</p>\n<div class="progress">{items}</div>')


# ---------------------------------------------------------------------------------------------------- demo page

def write_demo_overview(summary: dict, path: str | os.PathLike) -> Path:
    """The demo's report.html: per setting the Dice table (and the missing-modality table), a link to the setting's
    detailed report, step timings and versions. `summary` is the demo's summary.json."""
    path = Path(path)
    trainers = summary["schedule"]["trainers"]
    minutes = summary.get("steps_total_seconds", summary["run_seconds"]) / 60
    parts = ["<h1>moe_nnunet demo <small>· M4oE against nnU-Net's own network</small></h1>",
             f"<p>Device <b>{_e(summary['device'])}</b>, mode <b>{_e(summary['mode'])}</b>: every model trained "
             f"{summary['schedule']['epochs']} epochs on fold 0 of its dataset with the same schedule "
             f"({', '.join(f'{_e(r)}: <code>{_e(t)}</code>' for r, t in trainers.items())}) and evaluated on the "
             f"fold's held-out cases with nnU-Net's own evaluation. The steps took {minutes:.1f} min "
             f"(this run: {summary['run_seconds'] / 60:.1f} min, reusing what was done); written "
             f"{_e(summary['date'])}; {_e(', '.join(f'{k} {v}' for k, v in summary['versions'].items()))}.</p>"]
    if summary.get("note"):
        parts.append(f'<p class="note">{_e(summary["note"])}</p>')
    for key, reason in summary.get("skipped", {}).items():
        parts.append(f'<p class="note">Setting {_e(key)} skipped: {_e(reason)}</p>')
    for key, r in summary["settings"].items():
        parts.append(_demo_setting_html(r))
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{v:.0f}</td></tr>" for k, v in summary["step_seconds"].items())
    parts.append("<details><summary>Time per step (seconds)</summary><table><tr><th>step</th><th>s</th></tr>"
                 f"{rows}</table><p class=\"how\">Steps reused from an earlier run keep their first time.</p></details>")
    path.write_text('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>moe_nnunet demo</title>'
                    f"<style>{STYLE}</style>\n{IMAGE_CHECK}</head>\n<body>\n" + "\n".join(parts)
                    + "\n</body></html>\n", encoding="utf-8")
    return path


def _demo_setting_html(r: dict) -> str:
    roles = list(r["models"])
    if r.get("modalities"):
        tags = " or ".join(sorted(set(r["modalities"].values())))
        channels = f"one image channel per case, {tags} (a modality tag per case; one expert per modality)"
    else:
        channels = f"channels {', '.join(r['channels'])} (one expert per channel)"
    parts = [f"<h2>{_e(r['title'])}</h2>", f"<p>{_e(r['dataset'])}, {_e(channels)}. Data: {_e(r['data'])}.</p>"]
    head = "".join(f"<th>{_e(role)}<br><small>{_e(r['models'][role]['trainer'])}</small></th>" for role in roles)
    body = []
    for name in r["labels"]:
        cells = [r["models"][role]["validation"]["labels"].get(name) for role in roles]
        body.append(f"<tr><td>{_e(name)}</td>{''.join(_bold_best([(c, _fmt(c)) for c in cells]))}</tr>")
    cells = [r["models"][role]["validation"]["mean"] for role in roles]
    body.append(f'<tr class="total"><td>mean (foreground)</td>{"".join(_bold_best([(c, _fmt(c)) for c in cells]))}</tr>')
    modalities = sorted({g for role in roles for g in r["models"][role]["validation"].get("per_modality_mean", {})})
    for g in modalities:
        n = sum(1 for c in r.get("modalities", {}).values() if c == g)
        cells = [r["models"][role]["validation"].get("per_modality_mean", {}).get(g) for role in roles]
        body.append(f"<tr><td>mean over the {n} {_e(g)} cases</td>"
                    f"{''.join(_bold_best([(c, _fmt(c)) for c in cells]))}</tr>")
    parts.append(f"<table><tr><th>Dice</th>{head}</tr>\n" + "\n".join(body) + "</table>")
    how = (f"Dice on the {len(r['held_out_cases'])} held-out cases of fold 0 ({_e(', '.join(r['held_out_cases']))}), "
           "from nnU-Net's validation of each model (<code>fold_0/validation/summary.json</code>); bold: the better "
           "model per row.")
    stock = r["models"].get("M4oE", {}).get("nnUNetv2_predict")
    if stock:
        how += (f" The same cases predicted with stock <code>nnUNetv2_predict</code> from the M4oE model folder, "
                f"without telling it any case's modality: mean Dice {stock['mean']:.3f}.")
    parts.append(f'<p class="how">{how}</p>')
    if r.get("missing_modality"):
        parts.append("<h3>With a modality missing</h3>")
        parts.append(missing_modality_html(r["missing_modality"], len(r["held_out_cases"]), 0))
    parts.append(f'<p><a href="{_e(r["report"])}">Detailed report</a>: Dice per case, gate weights per expert, '
                 "label and case, example segmentations, training curves.</p>")
    return "\n".join(parts)
