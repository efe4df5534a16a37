"""`moe_nnunet trainer_path`: print the folder to export as nnUNet_extTrainer."""
from __future__ import annotations

import argparse

from moe_nnunet.discovery import ext_trainer_dir


def run(args: argparse.Namespace) -> int:
    print(ext_trainer_dir())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer_path", help="print the folder for nnUNet_extTrainer "
                                            "(export nnUNet_extTrainer=$(moe_nnunet trainer_path))",
                       description="Print the folder that lets nnU-Net's stock commands find moe_nnunet's "
                                   "trainers: export nnUNet_extTrainer=$(moe_nnunet trainer_path)")
    p.set_defaults(func=run)
