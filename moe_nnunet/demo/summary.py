"""The demo's numbers: Dice from nnU-Net's evaluation summaries (`dice_summary`), each setting's headline (held-out
Dice with the full input and, where evaluated, with each modality removed, and what M4oE gains over the best other
model: `headline`) and the terminal tables (`demo_table`)."""
from __future__ import annotations

import json
from pathlib import Path

from moe_nnunet.evaluation.curves import verdict_words

__all__ = ["dice_summary", "headline", "demo_table"]


def dice_summary(summary_file: Path, names: dict[str, str], case_groups: dict[str, str] | None = None) -> dict:
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


def headline(result: dict) -> list[dict]:
    """A setting's headline rows, {"input", "dice": {model: mean Dice}, "m4oe_gain_points"}: the held-out cases with
    the full input (and per modality of a combined dataset), and with each modality removed where that was
    evaluated; the gain is M4oE's Dice minus the best other model's, in points."""
    rows = []
    if result.get("missing_modality"):
        mm = result["missing_modality"]
        for condition in next(iter(mm.values())):
            rows.append({"input": condition, "dice": {m: r[condition]["mean"] for m, r in mm.items()}})
    else:
        validation = {m: v["validation"] for m, v in result["models"].items()}
        rows.append({"input": "full input", "dice": {m: v["mean"] for m, v in validation.items()}})
        for group in sorted(set(result.get("modalities", {}).values())):
            rows.append({"input": f"full input, the {group} cases",
                         "dice": {m: v.get("per_modality_mean", {}).get(group) for m, v in validation.items()}})
    for row in rows:
        others = [v for m, v in row["dice"].items() if m != "M4oE" and v is not None]
        m4oe = row["dice"].get("M4oE")
        row["m4oe_gain_points"] = round(100 * (m4oe - max(others)), 1) if others and m4oe is not None else None
    return rows


def _cell(value: float | None, width: int) -> str:
    return f"{'–' if value is None else format(value, '.3f'):>{width}}"


def demo_table(summary: dict) -> str:
    """Plain-text tables of the demo, for the terminal: per setting the budget, each model's speed and plateau
    verdict, and the headline Dice."""
    lines = []
    for r in summary["settings"].values():
        b, models = r["budget"], list(r["models"])
        lines += ["", f"{r['title']} -- {r['dataset']}, {b['configuration']}, {len(r['held_out_cases'])} held-out "
                      f"cases of fold 0",
                  f"  every model: {b['iterations']} iterations ({b['epochs']} epochs x {b['epoch_iterations']}), "
                  f"batch {b['batch_size']}, patch {'x'.join(map(str, b['patch_size']))}, "
                  f"widths <= {b['max_features']}",
                  f"  {'model':<28}{'s / it':>8}{'pseudo-Dice':>13}  validation curve (last 25 % of the epochs)"]
        for model, m in r["models"].items():
            v = m["plateau"]
            rise = "" if v["rise"] is None else f", rise {v['rise']:+.3f} over the 25 % before"
            lines.append(f"  {model:<28}{m['seconds_per_iteration']:>8.3f}{_cell(v['last_quarter'], 13)}  "
                         f"{verdict_words(v)}{rise}")
        widths = [max(9, len(m) + 2) for m in models]
        lines += ["  mean Dice on the held-out cases:",
                  f"  {'input':<28}" + "".join(f"{m:>{w}}" for m, w in zip(models, widths)) + f"{'M4oE gain':>12}"]
        for row in r["headline"]:
            gain = row["m4oe_gain_points"]
            lines.append(f"  {row['input']:<28}" + "".join(_cell(row["dice"].get(m), w) for m, w in zip(models, widths))
                         + ("" if gain is None else f"{gain:>+9.1f} pt"))
    return "\n".join(lines)
