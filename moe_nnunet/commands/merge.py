"""`moe_nnunet merge`: plans that merge trained nnU-Net models (kept frozen) with a trainable per-label gate."""
from __future__ import annotations

import argparse
import sys

PROG = "moe_nnunet merge"


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.discovery import ensure_ext_trainer_env
    from moe_nnunet.trainers.checkpointing import UnreadableCheckpointError
    from moe_nnunet.workflow.merge import MergeError, merge_models
    from moe_nnunet.workflow.plans_files import PlansFileError

    ensure_ext_trainer_env()  # to find the models' trainers (ours among them)
    try:
        result = merge_models(args.d, args.m, args.o, folds=args.f, selection=args.selection, top_k=args.top_k,
                              threshold=args.threshold, gate_hidden=args.gate_hidden, checkpoint=args.chk,
                              overwrite=args.overwrite)
    except (MergeError, PlansFileError, UnreadableCheckpointError, RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"Plans written: {result.plans_file}\nNext:")
    for command in result.commands:
        print(f"  {command}")
    for note in result.notes:
        print(note)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge trained nnU-Net models (frozen) into one MoE with a trainable gate",
                       description="Write plans for one model made of trained nnU-Net models, kept frozen, and a "
                                   "small gate that learns per case, voxel and label which model to trust "
                                   "(SAM-Med3D-MoE, Wang et al., MICCAI 2024). The models must share one "
                                   "preprocessing; the dataset -d must have the union of their labels (matched "
                                   "by name). Train the gate with nnUNetv2_train -tr nnUNetTrainerMoEMerge.")
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name the gate trains on")
    p.add_argument("-m", nargs="+", required=True, metavar="MODEL_FOLDER",
                   help="trained model folders (TRAINER__PLANS__CONFIGURATION; a path, or a name in "
                        "$nnUNet_results/<dataset>); the first is the general model")
    p.add_argument("-o", required=True, metavar="PLANS_NAME", help="name of the merged plans (e.g. nnUNetMergedPlans); "
                                                                   "never nnU-Net's own nnUNetPlans")
    p.add_argument("--overwrite", action="store_true", help="replace existing plans of that name (refused otherwise)")
    p.add_argument("-f", nargs="+", default=None, metavar="FOLD",
                   help="the models' fold to use for every gate fold: one for all models, or one per model "
                        "(default: gate fold F uses each model's fold F)")
    p.add_argument("--selection", choices=("soft", "topk", "threshold"), default="soft",
                   help="soft: the gate's weights; topk: the --top_k best models per label and voxel, "
                        "renormalised; threshold: the best model when its weight reaches --threshold, else the "
                        "general model (default: soft)")
    p.add_argument("--top_k", type=int, default=1, help="models kept per label and voxel by topk (default 1)")
    p.add_argument("--threshold", type=float, default=0.5, help="confidence for threshold selection (default 0.5)")
    p.add_argument("--gate_hidden", type=int, default=16, help="width of the gate's convolutions (default 16)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint of the models' folds to load "
                                                                "(default checkpoint_final.pth)")
    p.set_defaults(func=run)
