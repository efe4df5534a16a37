"""`moe_nnunet` command line: one subcommand per module in `moe_nnunet.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed arguments and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# order shown in `moe_nnunet --help`
COMMANDS = ("plan", "cv", "predict", "robustness", "compare", "trainer_path", "datasets", "combine", "merge", "demo",
            "bench", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe_nnunet",
        description="Mixture-of-Experts segmentation inside nnU-Net v2. Plan with `moe_nnunet plan`, then use "
                    "the stock nnUNetv2_* commands with -tr nnUNetTrainerM4oE -p nnUNetM4oEPlans "
                    "(after: export nnUNet_extTrainer=$(moe_nnunet trainer_path)).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"moe_nnunet.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"moe_nnunet.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
