"""`moe_nnunet combine`: one raw nnU-Net dataset from single-channel datasets of different modalities."""
from __future__ import annotations

import argparse
import json
import sys

PROG = "moe_nnunet combine"


def run(args: argparse.Namespace) -> int:
    if len(args.d) < 2:
        print(f"{PROG}: error: give at least two datasets with -d (one per modality)", file=sys.stderr)
        return 2
    if args.modalities is not None and len(args.modalities) != len(args.d):
        print(f"{PROG}: error: {len(args.modalities)} --modalities for {len(args.d)} datasets; give one tag per "
              f"-d dataset, in the same order", file=sys.stderr)
        return 2
    from moe_nnunet.datasets.combine import combine_datasets, read_modality_tags

    try:
        folder = combine_datasets(args.d, args.o, args.name, args.modalities, args.raw, progress=True,
                                  overwrite=args.overwrite, renames=args.rename)
    except (ValueError, FileExistsError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    tags = read_modality_tags(json.loads((folder / "dataset.json").read_text(encoding="utf-8")))
    annotated = tags.get("annotated_labels")
    for tag, source in tags["sources"].items():
        print(f"  {tag}: {source['num_cases']} cases from {source['dataset']}" +
              (f", annotating {', '.join(annotated[tag])}" if annotated else ""))
    if annotated:
        print("  partial labels: the datasets annotate different labels; the M4oE trainers learn from each case "
              "only the labels its dataset annotates, and validation scores only those")
    print("  intensities unchanged; channel 0 is 'zscore': nnU-Net standardises each case by its own mean and std, "
          "in preprocessing and in nnUNetv2_predict, so prediction needs no modality tag")
    dataset_id = int(args.o)
    print(f"Written: {folder}\nNext:\n"
          f"  nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity -c 3d_fullres\n"
          f"  moe_nnunet plan -d {dataset_id}                  # one expert per modality: "
          f"{', '.join(tags['modalities'])}\n"
          f"  nnUNetv2_preprocess -d {dataset_id} -plans_name nnUNetM4oEPlans -c 3d_fullres")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("combine", help="combine single-channel datasets of different modalities (CT, MRI, ...) "
                                       "into one dataset with one expert per modality",
                       description="Write one raw nnU-Net v2 dataset from single-channel datasets of different "
                                   "modalities. Labels are mapped by name into the union of all datasets' labels "
                                   "(datasets may annotate different labels: the M4oE trainers then learn from "
                                   "each case only the labels its dataset annotates); "
                                   "images keep their original intensities and the channel is declared zscore, "
                                   "so nnU-Net normalises each case by its own mean and std and "
                                   "nnUNetv2_predict needs no modality tag; case ids get the modality as prefix "
                                   "and the tags are stored in dataset.json and modalities.json.")
    p.add_argument("-d", nargs="+", required=True, metavar="DATASET",
                   help="dataset ids or names, one per modality (each with one channel)")
    p.add_argument("-o", type=int, required=True, metavar="NEW_ID", help="id of the new dataset")
    p.add_argument("--name", required=True, help="name of the new dataset (Dataset<NEW_ID>_<NAME>)")
    p.add_argument("--modalities", nargs="+", default=None, metavar="TAG",
                   help="one modality tag per -d dataset (default: each dataset's channel name)")
    p.add_argument("--rename", nargs="+", default=[], metavar="DATASET:OLD=NEW",
                   help="give label OLD of DATASET (as given with -d) the name NEW before labels are matched by name "
                        "(a name shared by several datasets means the same structure)")
    p.add_argument("--raw", default=None, metavar="DIR",
                   help="folder with the inputs and for the output (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset of that id and name (refused otherwise); its preprocessed data "
                        "and plans then need to be made again")
    p.set_defaults(func=run)
