"""`moe_nnunet demo`: the whole pipeline on real packaged data and a multi-channel phantom (see moe_nnunet.demo)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.demo import run_demo
    from moe_nnunet.evaluation.equal_budget import CompareError
    from moe_nnunet.workflow.steps import StepFailed

    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        run_demo(Path(args.output).resolve(), device=device, fresh=args.fresh, quick=args.quick,
                 settings=tuple(args.settings))
    except (StepFailed, CompareError) as e:
        print(f"moe_nnunet demo: error: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from moe_nnunet.demo import SETTINGS

    p = sub.add_parser("demo", help="run the whole pipeline: M4oE vs nnU-Net on real CT + MRI data and a phantom, "
                                    "every model trained to a plateau on one budget",
                       description="Two settings: (ct_mri) real lung CT and brain MRI lesion crops combined into one "
                                   "dataset with a CT and an MRI expert; (phantom) a synthetic BraTS-like 4-channel "
                                   "phantom, predicted with each modality removed. Each builds its dataset, plans "
                                   "and preprocesses nnU-Net's 2d configuration, trains M4oE and nnU-Net's baselines "
                                   "on fold 0 with narrowed plans and one iteration budget for every model, shows "
                                   "each model's validation curve and whether it plateaued, predicts the held-out "
                                   "cases and evaluates them with nnU-Net. Writes report.html and summary.json. "
                                   "Finished steps are reused.")
    p.add_argument("--output", default="demo_output", help="output folder (default ./demo_output)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available. The CPU scale trains small 2d patches and narrow networks; the "
                        "GPU scale the builders' own image sizes and wider networks, with more iterations")
    p.add_argument("--quick", action="store_true",
                   help="2 epochs of 2 iterations per model: checks that everything runs; the Dice means nothing")
    p.add_argument("--settings", nargs="+", choices=[s.key for s in SETTINGS], default=[s.key for s in SETTINGS],
                   help="which settings to run (default: all)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first and redo every step")
    p.set_defaults(func=run)
