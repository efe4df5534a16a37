"""`moe_nnunet demo`: end-to-end run on real packaged data (see moe_nnunet.demo)."""
from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.demo import run_demo
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_demo(Path(args.output).resolve(), device=device, fresh=args.fresh)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on real packaged data: M4oE vs nnU-Net",
                       description="Build a real dataset from packaged data, plan, preprocess, train M4oE and "
                                   "nnU-Net's baseline on fold 0 with the same schedule, predict the held-out "
                                   "cases and write summary.json and report.md. Finished steps are reused.")
    p.add_argument("--output", default="demo_output", help="output folder (default ./demo_output)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first and redo every step")
    p.set_defaults(func=run)
