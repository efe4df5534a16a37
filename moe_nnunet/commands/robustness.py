"""`moe_nnunet robustness`: Dice with each modality missing, for trained models side by side."""
from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.evaluation.robustness import evaluate_missing_modalities

    if len(args.p) not in (1, len(args.tr)):
        print("moe_nnunet robustness: give one -p for all trainers or one per -tr.", file=sys.stderr)
        return 2
    plans = args.p * len(args.tr) if len(args.p) == 1 else args.p
    try:
        report = evaluate_missing_modalities(args.d, args.c, list(zip(args.tr, plans)), args.f, args.o,
                                             device=args.device, use_mirroring=args.tta, checkpoint=args.chk,
                                             num_processes=args.np)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"moe_nnunet robustness: error: {e}", file=sys.stderr)
        return 1
    from moe_nnunet.evaluation.robustness import robustness_table
    print(robustness_table(report))
    print(f"written: {args.o}/robustness.json, robustness.md")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robustness", help="per-label Dice with each modality missing, for several trained models",
                       description="Predict a fold's held-out cases with every trained model given, with the full "
                                   "input and with each modality removed in turn (M4oE masks the expert; other "
                                   "models get the channel zero-filled), and evaluate them with nnU-Net's own "
                                   "metrics. Writes robustness.json and robustness.md.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-tr", nargs="+", required=True, help="trainers to compare")
    p.add_argument("-p", nargs="+", default=["nnUNetPlans"], help="plans per trainer, or one for all")
    p.add_argument("-f", type=int, default=0, help="fold whose held-out cases are predicted (default 0)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device (default cuda)")
    p.add_argument("--tta", action="store_true", help="mirror at test time (nnU-Net's default; slower)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    p.add_argument("-np", type=int, default=2,
                   help="processes for preprocessing, export and evaluation; 0 predicts in this process, which is "
                        "fastest for a few small cases (default 2)")
    p.set_defaults(func=run)
