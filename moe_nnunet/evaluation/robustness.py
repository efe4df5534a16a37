"""How much a trained model loses when a modality is missing: per-label Dice on a fold's held-out cases with
the full input and with each modality removed in turn, side by side for several trainers.

Predictions go through `moe_nnunet.evaluation.predict` (nnU-Net's predictor; M4oE masks experts, the others get the
channel zero-filled after normalisation, as `nnUNetTrainer` would see it), Dice through nnU-Net's own
`compute_metrics_on_folder` against the raw labels.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

__all__ = ["evaluate_missing_modalities", "robustness_table", "held_out_cases", "copy_held_out", "folder_metrics"]


def held_out_cases(preprocessed: Path, fold: int) -> list[str]:
    """The validation cases of `fold` in nnU-Net's splits_final.json (written when the fold is first trained)."""
    splits = preprocessed / "splits_final.json"
    if not splits.is_file():
        raise FileNotFoundError(f"{splits} not found: train fold {fold} first (nnU-Net writes the split then).")
    return sorted(json.loads(splits.read_text())[fold]["val"])


def copy_held_out(raw: Path, cases: Sequence[str], ending: str, output: Path) -> tuple[Path, Path]:
    """Copy the cases' raw images and labels to `output`/held_out_images and held_out_labels (nnU-Net's
    evaluation wants a prediction for every reference file, so the references are only these cases)."""
    inputs, refs = output / "held_out_images", output / "held_out_labels"
    for folder, pattern in ((inputs, "imagesTr/{c}_*" + ending), (refs, "labelsTr/{c}" + ending)):
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            for f in raw.glob(pattern.format(c=case)):
                shutil.copy(f, folder / f.name)
    return inputs, refs


def folder_metrics(refs: Path, pred: Path, reader_writer, ending: str, labels: Sequence, num_processes: int
                   ) -> dict:
    """nnU-Net's metrics of every prediction in `pred` against `refs`, written to `pred`/summary.json.

    With `num_processes` >= 1 this is nnU-Net's `compute_metrics_on_folder` (a worker pool); with 0 the cases are
    scored in this process by nnU-Net's `compute_metrics` and averaged as nnU-Net averages them (mean over cases
    per label ignoring NaN, then the mean over foreground labels), which saves starting a pool for a few cases.
    """
    from nnunetv2.evaluation.evaluate_predictions import (compute_metrics, compute_metrics_on_folder,
                                                          save_summary_json)
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    import numpy as np

    if num_processes >= 1:
        return compute_metrics_on_folder(str(refs), str(pred), str(pred / "summary.json"), reader_writer, ending,
                                         labels, num_processes=num_processes)
    files = sorted(f.name for f in pred.iterdir() if f.name.endswith(ending))
    if not files:
        raise FileNotFoundError(f"no predictions ending in {ending} in {pred}")
    cases = [compute_metrics(str(refs / f), str(pred / f), reader_writer, labels) for f in files]
    metrics = list(cases[0]["metrics"][labels[0]])
    means = {r: {m: float(np.nanmean([c["metrics"][r][m] for c in cases])) for m in metrics} for r in labels}
    foreground = {m: float(np.mean([means[r][m] for r in labels if r not in (0, "0")])) for m in metrics}
    for case in cases:
        recursive_fix_for_json_export(case)
    summary = {"metric_per_case": cases, "mean": means, "foreground_mean": foreground}
    save_summary_json(summary, str(pred / "summary.json"))
    return summary


def evaluate_missing_modalities(dataset: str, configuration: str, models: Sequence[tuple[str, str]],
                                fold: int, output: str | os.PathLike, device: str = "cpu",
                                use_mirroring: bool = False, checkpoint: str = "checkpoint_final.pth",
                                num_processes: int = 1) -> dict:
    """Per-label Dice of each `(trainer, plans)` model's fold on the fold's held-out cases, for the full input
    and each single modality removed. Writes predictions and `robustness.json` under `output`; returns the
    results: {trainer: {condition: {"labels": {name: dice}, "mean": dice, "how": str}}}."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from moe_nnunet.discovery import ensure_ext_trainer_env
    from moe_nnunet.evaluation.predict import MissingModalityPredictor, missing_mode, predict_with_missing

    ensure_ext_trainer_env()
    name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    raw = Path(nnUNet_raw) / name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    channels = {int(k): v for k, v in dataset_json["channel_names"].items()}
    labels = {k: v for k, v in dataset_json["labels"].items() if k not in ("background", "ignore")}
    cases = held_out_cases(Path(nnUNet_preprocessed) / name, fold)
    output = Path(output)
    inputs, refs = copy_held_out(raw, cases, ending, output)

    conditions = [("full input", [])] + [(f"without {channels[c]}", [channels[c]]) for c in sorted(channels)]
    results: dict = {}
    inputs_checked = False
    for trainer, plans in models:
        predictor = MissingModalityPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                             perform_everything_on_device=device == "cuda",
                                             device=torch.device(device), verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(get_output_folder(name, trainer, plans, configuration),
                                                       [fold], checkpoint_name=checkpoint)
        mode = missing_mode(predictor.network, recursive_find_trainer_class_by_name(trainer))
        results[trainer] = {}
        for condition, missing in conditions:
            pred = output / "predictions" / trainer / condition.replace(" ", "_")
            predict_with_missing(predictor, None, str(inputs), str(pred), missing=missing,
                                 zero_fill=mode != "mask", existing="overwrite", check_inputs=not inputs_checked,
                                 num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)
            inputs_checked = True  # the held-out inputs are checked once, before the first prediction
            summary = folder_metrics(refs, pred, predictor.plans_manager.image_reader_writer_class(), ending,
                                     predictor.label_manager.foreground_labels, num_processes)
            per_label = {k: round(float(summary["mean"][v]["Dice"]), 4) for k, v in labels.items()}
            how = "complete" if not missing else ("experts masked" if mode == "mask" else
                                                  "zero-filled" + (" (trained for it)" if mode else ""))
            results[trainer][condition] = {"labels": per_label,
                                           "mean": round(float(summary["foreground_mean"]["Dice"]), 4), "how": how}
    report = {"dataset": name, "configuration": configuration, "fold": fold, "held_out_cases": cases,
              "mirroring": use_mirroring, "results": results}
    (output / "robustness.json").write_text(json.dumps(report, indent=1))
    (output / "robustness.md").write_text(robustness_table(report))
    return report


def robustness_table(report: dict) -> str:
    """Markdown: one row per condition and label, one column per model."""
    results = report["results"]
    models = list(results)
    conditions = list(next(iter(results.values())))
    labels = list(next(iter(next(iter(results.values())).values()))["labels"])
    lines = [f"Dice on the {len(report['held_out_cases'])} held-out cases of fold {report['fold']} of "
             f"{report['dataset']} ({report['configuration']})", "",
             "| input | label | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for condition in conditions:
        for label in labels + ["mean"]:
            cells = []
            for m in models:
                r = results[m][condition]
                cells.append(f"{(r['mean'] if label == 'mean' else r['labels'][label]):.3f}")
            lines.append(f"| {condition} | {'**mean**' if label == 'mean' else label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
