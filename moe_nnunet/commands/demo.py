"""`moe_nnunet demo`: the whole pipeline on real packaged data and a multi-channel phantom (see moe_nnunet.demo)."""
from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.demo import run_demo
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_demo(Path(args.output).resolve(), device=device, fresh=args.fresh, quick=args.quick,
             settings=tuple(args.settings))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from moe_nnunet.demo import SETTINGS

    p = sub.add_parser("demo", help="run the whole pipeline: M4oE vs nnU-Net on real CT + MRI data and a phantom",
                       description="Two settings: (ct_mri) real lung CT and brain MRI lesion crops combined into one "
                                   "dataset with a CT and an MRI expert; (phantom) a synthetic 3-channel phantom, "
                                   "predicted with each modality removed. Each builds its dataset, plans, "
                                   "preprocesses, trains M4oE and nnU-Net's baselines on fold 0 with the same "
                                   "schedule, predicts the held-out cases and evaluates them with nnU-Net. Writes "
                                   "report.html and summary.json. Finished steps are reused.")
    p.add_argument("--output", default="demo_output", help="output folder (default ./demo_output)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available. The CPU schedule takes 13-14 minutes on 2 cores, the "
                        "GPU one trains 100 epochs per model")
    p.add_argument("--quick", action="store_true",
                   help="2 epochs of 4 iterations: checks that everything runs; the Dice means nothing")
    p.add_argument("--settings", nargs="+", choices=[s.key for s in SETTINGS], default=[s.key for s in SETTINGS],
                   help="which settings to run (default: all)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first and redo every step")
    p.set_defaults(func=run)
