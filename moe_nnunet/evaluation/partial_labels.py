"""Scores of datasets with partial labels (`moe_nnunet combine` of datasets that annotate different labels).

nnU-Net's `compute_metrics_on_folder` scores every label on every case. A case whose dataset does not annotate a
label has none of it in its reference, so a correct prediction of that structure would count as a Dice of 0 (a
"fake zero"). `score_annotated_only` rewrites such a summary in nnU-Net's own format: Dice and IoU of a label on a
case whose dataset does not annotate it become NaN (not scored, as nnU-Net marks a label absent from both
reference and prediction), and the means are taken over the cases that annotate each label. `per_dataset` gives
the mean Dice of each source dataset on the labels it annotates.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["case_id_of", "score_annotated_only", "per_dataset", "rescore_folder"]

UNSCORED = ("Dice", "IoU")


def case_id_of(file_name: str, ending: str) -> str:
    name = Path(file_name).name
    return name[:-len(ending)] if name.endswith(ending) else name


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def score_annotated_only(summary: dict, annotated_of_case: Mapping[str, set[int]], ending: str) -> dict:
    """nnU-Net's `summary.json` content with unannotated labels unscored on each case and the means recomputed
    (mean over cases per label ignoring NaN, then the mean over labels, as nnU-Net averages)."""
    cases = []
    for case in summary["metric_per_case"]:
        annotated = annotated_of_case[case_id_of(case["reference_file"], ending)]
        metrics = {}
        for label, values in case["metrics"].items():
            if int(label) not in annotated:
                values = {**values, **{m: float("nan") for m in UNSCORED if m in values}}
            metrics[label] = values
        cases.append({**case, "metrics": metrics})
    labels = list(summary["mean"])
    names = list(summary["mean"][labels[0]]) if labels else []
    means = {label: {m: _mean([c["metrics"][label][m] for c in cases]) for m in names} for label in labels}
    foreground = {m: _mean([means[label][m] for label in labels]) for m in names}
    return {**summary, "metric_per_case": cases, "mean": means, "foreground_mean": foreground}


def per_dataset(summary: dict, case_source: Mapping[str, str], annotated: Mapping[str, list[int]],
                label_names: Mapping[int, str], ending: str) -> dict:
    """{source: {"num_cases", "labels": {name: mean Dice}, "mean": mean over its labels}} from a summary whose
    cases belong to the sources of `case_source`; each source is scored on the labels it annotates only."""
    result = {}
    for source, values in annotated.items():
        cases = [c for c in summary["metric_per_case"]
                 if case_source.get(case_id_of(c["reference_file"], ending)) == source]
        if not cases:
            continue
        dice = {label_names[v]: _mean([c["metrics"][str(v)]["Dice"] for c in cases]) for v in values if v != 0}
        result[source] = {"num_cases": len(cases), "labels": dice, "mean": _mean(list(dice.values()))}
    return result


def rescore_folder(folder: Path, dataset_json: dict) -> dict | None:
    """Rewrite `folder`/summary.json (nnU-Net's, of validation or cross-validation predictions) so that labels are
    scored only on cases whose dataset annotates them, and write `summary_per_dataset.json` beside it. Returns
    the per-dataset scores, or None when the dataset has no partial labels (nothing is written then)."""
    from moe_nnunet.datasets.combine import annotated_label_values, read_modality_tags

    annotated = annotated_label_values(dataset_json)
    if annotated is None:
        return None
    case_source = read_modality_tags(dataset_json)["case_modality"]
    ending = dataset_json["file_ending"]
    summary_file = Path(folder) / "summary.json"
    summary = json.loads(summary_file.read_text())
    annotated_of_case = {case: set(annotated[source]) for case, source in case_source.items()}
    rescored = score_annotated_only(summary, annotated_of_case, ending)
    label_names = {int(v): k for k, v in dataset_json["labels"].items() if k != "ignore"}
    datasets = per_dataset(rescored, case_source, annotated, label_names, ending)
    tmp = summary_file.with_name(summary_file.name + ".partial")
    tmp.write_text(json.dumps(rescored, indent=2))
    tmp.replace(summary_file)
    (Path(folder) / "summary_per_dataset.json").write_text(json.dumps(
        {"scored": "each dataset on the labels it annotates; other labels' Dice is NaN on its cases",
         "datasets": datasets}, indent=2))
    return datasets
