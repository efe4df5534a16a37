"""The report's PNGs: gate weights over the epochs, per scale, label and validation case, and example
segmentations of the median, worst and best validation cases."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_nnunet.evaluation.report.model import Model

__all__ = ["draw_figures"]

MAX_OVERLAY_CASES = 3
# label colours: strong, distinguishable on grey (matplotlib's tab10 without its grey)
LABEL_COLORS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#8c564b")


def draw_figures(model: Model, others: list[Model], stats: dict, gate: dict | None, out: Path) -> dict:
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
    from moe_nnunet.evaluation.model_folder import parse_model_folder_name

    lines = []
    for part in parse_model_folder_name(title) or (title,):
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
