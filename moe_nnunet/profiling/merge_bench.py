"""Helpers of the non-forgetting benchmark of merged models (scripts/bench_merge.sh).

The script builds the scenario with stock nnU-Net programs; these are the few steps that are not a program:

    python -m moe_nnunet.profiling.merge_bench prepare RAW ID --num_train 20 --num_test 10    # phantom + test cases
    python -m moe_nnunet.profiling.merge_bench weakest VALIDATION_SUMMARY DATASET_JSON        # label to specialise in
    python -m moe_nnunet.profiling.merge_bench derive RAW SOURCE_ID NEW_ID NAME LABEL         # dataset with that label only
    python -m moe_nnunet.profiling.merge_bench table OUT_JSON NAME=SUMMARY:DATASET_JSON ...   # per-label Dice table
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["prepare_phantom", "weakest_label", "derive_label_subset", "dice_table"]

ENDING = ".nii.gz"


def _dataset_folder(raw: Path, dataset_id: int) -> Path:
    found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one Dataset{dataset_id:03d}_* in {raw}, found {[f.name for f in found]}")
    return found[0]


def prepare_phantom(raw: Path, dataset_id: int, num_train: int, num_test: int, seed: int = 0) -> Path:
    """The SYNTHETIC 3-channel phantom at the CPU demo's size (20 x 32 x 32 voxels of 3 x 1.5 x 1.5 mm), its
    last `num_test` cases moved to imagesTs / labelsTs (never trained on by any model)."""
    from moe_nnunet.datasets.phantom import build_phantom

    folder = build_phantom(raw, dataset_id, name="MergePhantom", num_cases=num_train + num_test, seed=seed,
                           shape=(20, 32, 32), spacing=(3.0, 1.5, 1.5))
    for sub in ("imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    for i in range(num_train, num_train + num_test):
        case = f"MergePhantom_{i:03d}"
        for f in (folder / "imagesTr").glob(f"{case}_*{ENDING}"):
            f.rename(folder / "imagesTs" / f.name)
        (folder / "labelsTr" / f"{case}{ENDING}").rename(folder / "labelsTs" / f"{case}{ENDING}")
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    dataset["numTraining"] = num_train
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return folder


def weakest_label(validation_summary: Path, dataset_json: Path) -> str:
    """The label with the lowest Dice in an nnU-Net validation summary.json (by name)."""
    names = {str(v): k for k, v in json.loads(dataset_json.read_text(encoding="utf-8"))["labels"].items()}
    mean = json.loads(validation_summary.read_text(encoding="utf-8"))["mean"]
    return names[min(mean, key=lambda value: mean[value]["Dice"])]


def derive_label_subset(raw: Path, source_id: int, dataset_id: int, name: str, keep: Sequence[str]) -> Path:
    """A copy of raw dataset `source_id` whose label maps keep only the labels `keep` (renumbered 1..k in that
    order, every other label becomes background): the same images and case ids, so the same nnU-Net splits."""
    source = _dataset_folder(raw, source_id)
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    missing = [k for k in keep if k not in dataset["labels"]]
    if missing:
        raise ValueError(f"{source.name} has no labels {missing}; its labels are {list(dataset['labels'])}")
    lut = np.zeros(max(dataset["labels"].values()) + 1, dtype=np.uint8)
    for new, label in enumerate(keep, start=1):
        lut[dataset["labels"][label]] = new
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        shutil.rmtree(folder)
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if not (source / images).is_dir():
            continue
        shutil.copytree(source / images, folder / images)
        (folder / labels).mkdir(parents=True)
        for f in sorted((source / labels).glob(f"*{ENDING}")):
            image = sitk.ReadImage(str(f))
            mapped = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(image)])
            mapped.CopyInformation(image)
            sitk.WriteImage(mapped, str(folder / labels / f.name), useCompression=True)
    dataset.update(name=name, labels={"background": 0, **{k: i for i, k in enumerate(keep, start=1)}},
                   description=f"{source.name} with only the labels {list(keep)} (moe_nnunet.profiling.merge_bench)")
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return folder


def dice_table(models: dict[str, tuple[Path, Path]], labels: Sequence[str]) -> tuple[dict, str]:
    """Per-label Dice of each model from nnU-Net evaluation summaries (`name -> (summary.json, dataset.json)`,
    labels matched by name), as a dict and a markdown table. The mean is over `labels`; a model that does not
    predict a label counts 0 there (it cannot segment it). Bold: the best on each row."""
    result: dict[str, dict[str, float | None]] = {}
    for model, (summary, dataset_json) in models.items():
        values = json.loads(dataset_json.read_text(encoding="utf-8"))["labels"]
        mean = json.loads(summary.read_text(encoding="utf-8"))["mean"]
        result[model] = {label: (mean[str(values[label])]["Dice"] if label in values else None) for label in labels}
        result[model]["mean"] = float(np.mean([result[model][label] or 0.0 for label in labels]))
    rows = ["| label | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for label in [*labels, "mean"]:
        cells = [result[m][label] for m in models]
        best = max(c for c in cells if c is not None)
        rows.append(f"| {label} | " + " | ".join("—" if c is None else (f"**{c:.3f}**" if c == best else f"{c:.3f}")
                                                for c in cells) + " |")
    return result, "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_nnunet.profiling.merge_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("raw", type=Path)
    p.add_argument("id", type=int)
    p.add_argument("--num_train", type=int, default=20)
    p.add_argument("--num_test", type=int, default=10)
    p = sub.add_parser("weakest")
    p.add_argument("summary", type=Path)
    p.add_argument("dataset_json", type=Path)
    p = sub.add_parser("derive")
    p.add_argument("raw", type=Path)
    p.add_argument("source_id", type=int)
    p.add_argument("id", type=int)
    p.add_argument("name")
    p.add_argument("labels", nargs="+")
    p = sub.add_parser("table")
    p.add_argument("output", type=Path, help="JSON file for the numbers")
    p.add_argument("models", nargs="+", metavar="NAME=SUMMARY:DATASET_JSON")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        print(prepare_phantom(args.raw, args.id, args.num_train, args.num_test))
    elif args.step == "weakest":
        print(weakest_label(args.summary, args.dataset_json))
    elif args.step == "derive":
        print(derive_label_subset(args.raw, args.source_id, args.id, args.name, args.labels))
    else:
        models = {}
        for spec in args.models:
            name, files = spec.split("=", 1)
            summary, dataset_json = files.split(":", 1)
            models[name] = (Path(summary), Path(dataset_json))
        first = next(iter(models.values()))[1]
        labels = [k for k, v in json.loads(first.read_text(encoding="utf-8"))["labels"].items() if v and k != "ignore"]
        result, table = dice_table(models, labels)
        args.output.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
