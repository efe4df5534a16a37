"""Partial labels on real-derived data, in 2d on a CPU: one M4oE model over two datasets that annotate different
labels, against one nnU-Net model per dataset and against the naive combination.

    python scripts/partial_labels_experiment.py OUTPUT [--iterations 1200] [--num_cases 40]

From the ICBM152 dataset with simulated FLAIR and synthetic white-matter lesions (`icbm_flair_lesions`, whose every
case is fully annotated), two single-channel datasets are cut that share no case and annotate different labels:

* ``T1Tissue``: the T1 channel of the first half of the cases, annotating grey and white matter (a lesion, invisible
  in T1, counts as white matter);
* ``FlairLesions``: the FLAIR channel of the other half, annotating the lesions only (grey and white matter are
  background in its labels, as in a lesion dataset).

`moe_nnunet combine` joins them (tags T1, FLAIR; union labels grey_matter, white_matter, lesion). Trained, each on
fold 0 with the same held-out cases (the combined split is the union of the two datasets' splits), with the widths
and batch of `moe_nnunet compare`:

* nnU-Net on each dataset alone, `--iterations` each;
* M4oE on the combination with the marginal loss (`nnUNetTrainerM4oE_compare`), 2 x `--iterations`;
* M4oE on the combination with unannotated labels taken for background (`nnUNetTrainerM4oENaiveLabels_compare`),
  2 x `--iterations`.

Writes OUTPUT/partial_labels.json and .md: the Dice of each dataset's held-out cases on the labels it annotates
(from each model's fold-0 validation, `summary_per_dataset.json`), the plateau verdict of each validation curve,
and, because the source annotation is complete, the Dice on the FLAIR cases of the grey and white matter their
dataset does not annotate (what a union-label model should still find there).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from moe_nnunet.datasets.combine import combine_datasets
from moe_nnunet.datasets.common import write_nnunet_dataset
from moe_nnunet.datasets.icbm_flair import LABELS, build_icbm_flair_lesions
from moe_nnunet.evaluation.curves import plateau_verdict, read_curves
from moe_nnunet.evaluation.equal_budget import CONFIGURATION, M4OE_PLANS, Budget, train_models
from moe_nnunet.workflow.steps import Steps, epochs_logged

SOURCE_ID, T1_ID, FLAIR_ID, COMBINED_ID = 940, 941, 942, 943
GM, WM, LESION = LABELS["grey_matter"], LABELS["white_matter"], LABELS["lesion"]


def _cut(raw: Path, source: Path, num_cases: int) -> dict[str, Path]:
    """The two partial datasets from the fully annotated source; returns {case id: full label file}."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    channels = {v: int(k) for k, v in dataset_json["channel_names"].items()}
    ids = sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))[:num_cases]
    half = len(ids) // 2
    full = {}
    for dataset_id, name, channel, cases, relabel in (
            (T1_ID, "T1Tissue", "T1", ids[:half], {0: 0, GM: 1, WM: 2, LESION: 2}),
            (FLAIR_ID, "FlairLesions", "FLAIR", ids[half:], {0: 0, GM: 0, WM: 0, LESION: 1})):
        labels = {"background": 0, "grey_matter": 1, "white_matter": 2} if channel == "T1" else \
            {"background": 0, "lesion": 1}
        written = []
        for case in cases:
            image = sitk.ReadImage(str(source / "imagesTr" / f"{case}_{channels[channel]:04d}.nii.gz"))
            label = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
            values = sitk.GetArrayFromImage(label)
            lut = np.zeros(int(values.max()) + 1, np.uint8)
            for old, new in relabel.items():
                if old < len(lut):
                    lut[old] = new
            partial = sitk.GetImageFromArray(lut[values])
            partial.CopyInformation(label)
            written.append((f"{name}_{case.rsplit('_', 1)[-1]}", [image], partial))
            full[f"{channel}_{name}_{case.rsplit('_', 1)[-1]}"] = source / "labelsTr" / f"{case}.nii.gz"
        write_nnunet_dataset(raw, dataset_id, name, written, [channel], labels,
                             extra={"description": f"{channel} channel of {source.name}, partial labels"})
    return full


def _write_splits(pre: Path) -> None:
    """nnU-Net's 5-fold splits of each partial dataset, and their union (prefixed) for the combination."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    combined = [{"train": [], "val": []} for _ in range(5)]
    for folder, tag in ((f"Dataset{T1_ID}_T1Tissue", "T1"), (f"Dataset{FLAIR_ID}_FlairLesions", "FLAIR")):
        cases = sorted(p.name[:-len(".nii.gz")] for p in (pre.parent / "nnUNet_raw" / folder / "labelsTr")
                       .glob("*.nii.gz"))
        splits = generate_crossval_split(cases, seed=12345, n_splits=5)
        (pre / folder).mkdir(parents=True, exist_ok=True)
        (pre / folder / "splits_final.json").write_text(json.dumps(splits, indent=2))
        for fold, split in zip(combined, splits):
            for key in ("train", "val"):
                fold[key] += [f"{tag}_{c}" for c in split[key]]
    folder = pre / f"Dataset{COMBINED_ID}_PartialT1Flair"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "splits_final.json").write_text(json.dumps(combined, indent=2))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float("nan") if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def _unannotated_tissue(fold: Path, full: dict[str, Path]) -> dict[str, float]:
    """Mean Dice of grey and white matter on the held-out FLAIR cases (not annotated there), from the fold's
    validation predictions against the source's complete labels."""
    scores: dict[str, list[float]] = {"grey_matter": [], "white_matter": []}
    for prediction in sorted((fold / "validation").glob("FLAIR_*.nii.gz")):
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(full[prediction.name[:-len(".nii.gz")]])))
        truth = np.where(truth == LESION, WM, truth)          # a lesion lies in white matter
        scores["grey_matter"].append(_dice(predicted == 1, truth == GM))
        scores["white_matter"].append(_dice(predicted == 2, truth == WM))
    return {k: round(float(np.nanmean(v)), 4) for k, v in scores.items() if v}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--iterations", type=int, default=1200, help="per dataset (the combined models get 2x)")
    parser.add_argument("--num_cases", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    out = args.output.resolve()
    raw, pre, res = out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"
    raw.mkdir(parents=True, exist_ok=True)
    steps = Steps(out / "logs", raw, pre, res, "partial_labels")
    source = raw / f"Dataset{SOURCE_ID}_ICBM152T1FlairLesions"
    if not (source / "dataset.json").is_file():
        build_icbm_flair_lesions(raw, SOURCE_ID, num_cases=args.num_cases)
    full = _cut(raw, source, args.num_cases)
    combined = raw / f"Dataset{COMBINED_ID}_PartialT1Flair"
    if not combined.is_dir():
        combine_datasets([T1_ID, FLAIR_ID], COMBINED_ID, "PartialT1Flair", ["T1", "FLAIR"], raw_root=raw)
    _write_splits(pre)

    single = Budget(iterations=args.iterations)
    double = Budget(iterations=2 * args.iterations)
    rows = {}
    for dataset_id, name in ((T1_ID, "nnU-Net on T1Tissue"), (FLAIR_ID, "nnU-Net on FlairLesions")):
        trained = train_models(steps, dataset_id, single, ["nnU-Net"], device=args.device, verify=False,
                               prefix=f"{name}: ")
        rows[name] = (trained.folders["nnU-Net"], args.iterations)
    trained = train_models(steps, COMBINED_ID, double, ["M4oE"], device=args.device, verify=False,
                           prefix="combined: ")
    rows["M4oE, marginal loss"] = (trained.folders["M4oE"], 2 * args.iterations)
    naive = "nnUNetTrainerM4oENaiveLabels_compare"
    fold = res / trained.dataset / f"{naive}__{M4OE_PLANS}__{CONFIGURATION}" / "fold_0"
    done = (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    resume = ["--c"] if not done and (fold / "checkpoint_latest.pth").is_file() else []
    steps.run("combined: train M4oE naive", done, "nnUNetv2_train", str(COMBINED_ID), CONFIGURATION, "0", "-tr",
              naive, "-p", M4OE_PLANS, "-device", args.device, *resume, total=double.schedule["num_epochs"],
              progress=epochs_logged(steps.log("combined: train M4oE naive")), unit="epoch")
    rows["M4oE, naive (unannotated = background)"] = (fold, 2 * args.iterations)

    report = {"iterations_per_dataset": args.iterations, "batch_size": single.batch_size,
              "max_features": single.max_features, "models": {}}
    for name, (fold, iterations) in rows.items():
        curves = read_curves(fold)
        entry = {"folder": str(fold), "iterations": iterations, "plateau": plateau_verdict(curves["mean_fg_dice"]),
                 "seconds": round(sum(curves["epoch_seconds"]), 1)}
        validation = fold / "validation"
        if (validation / "summary_per_dataset.json").is_file():
            per = json.loads((validation / "summary_per_dataset.json").read_text())["datasets"]
            entry["dice"] = {tag: r["labels"] for tag, r in per.items()}
            entry["unannotated_on_flair"] = _unannotated_tissue(fold, full)
        else:
            summary = json.loads((validation / "summary.json").read_text())
            labels = json.loads((fold.parent / "dataset.json").read_text())["labels"]
            tag = "T1" if "T1" in name else "FLAIR"
            entry["dice"] = {tag: {k: round(summary["mean"][str(v)]["Dice"], 4) for k, v in labels.items()
                                   if v != 0}}
        report["models"][name] = entry
    (out / "partial_labels.json").write_text(json.dumps(report, indent=2))
    lines = [f"Fold 0, held-out cases of each dataset, Dice on the labels it annotates; {args.iterations} iterations "
             f"per dataset (2x for the combined models), batch {single.batch_size}, widths <= "
             f"{single.max_features}, 2d.", "",
             "| model | iterations | T1: grey matter | T1: white matter | FLAIR: lesion | FLAIR: grey matter "
             "(not annotated) | FLAIR: white matter (not annotated) | plateau (rise) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, entry in report["models"].items():
        d, u = entry["dice"], entry.get("unannotated_on_flair", {})
        cell = lambda tag, label: f"{d[tag][label]:.3f}" if label in d.get(tag, {}) else ""
        p = entry["plateau"]
        lines.append(f"| {name} | {entry['iterations']} | {cell('T1', 'grey_matter')} | {cell('T1', 'white_matter')} "
                     f"| {cell('FLAIR', 'lesion')} | {u.get('grey_matter', '')} | {u.get('white_matter', '')} | "
                     f"{'yes' if p['plateaued'] else 'no' if p['plateaued'] is False else '?'} ({p.get('rise')}) |")
    (out / "partial_labels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
