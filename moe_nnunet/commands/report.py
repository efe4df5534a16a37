"""`moe_nnunet report`: an HTML report (Dice, gate weights, example segmentations, training curves) of a trained
model folder, optionally beside baseline models."""
from __future__ import annotations

import argparse
import sys

PROG = "moe_nnunet report"


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.evaluation.report import make_report

    try:
        page = make_report(args.results_folder, args.o, args.baseline, args.robustness)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"written: {page} and {page.parent / 'summary.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML report of a trained model: Dice, gate weights, example segmentations",
                       description="Read a trained nnU-Net model folder ($nnUNet_results/DatasetXXX_Name/"
                                   "<Trainer>__<Plans>__<configuration>, validated folds) and write report.html "
                                   "(opens from disk, PNGs beside it) and summary.json. Example segmentations need "
                                   "the raw images under $nnUNet_raw.")
    p.add_argument("results_folder", help="trained model folder holding fold_N subfolders")
    p.add_argument("--baseline", nargs="+", default=[], metavar="FOLDER",
                   help="model folders of the same dataset to compare with, side by side")
    p.add_argument("--robustness", default=None, metavar="JSON",
                   help="robustness.json of `moe_nnunet robustness` for these models: adds the missing-modality table")
    p.add_argument("-o", default=None, metavar="OUT", help="output folder (default RESULTS_FOLDER/report)")
    p.set_defaults(func=run)
