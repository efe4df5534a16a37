"""`moe_nnunet datasets list|build`: show and build the registered raw nnU-Net datasets."""
from __future__ import annotations

import argparse
import sys


def _list(args: argparse.Namespace) -> int:
    from moe_nnunet.datasets import DATASETS

    rows = [("name", "id", "data", "description")]
    rows += [(name, str(s.default_id), s.kind, s.description + (f" [needs: {s.needs}]" if s.needs else ""))
             for name, s in DATASETS.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _build(args: argparse.Namespace) -> int:
    from moe_nnunet.datasets import build_dataset

    kwargs = {}
    if args.num_cases is not None:
        kwargs["num_cases"] = args.num_cases
    if args.seed is not None:
        kwargs["seed"] = args.seed
    try:
        folder = build_dataset(args.name, args.id, args.raw, **kwargs)
    except (ValueError, ImportError, FileExistsError, RuntimeError) as e:
        print(f"moe_nnunet datasets build: error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `datasets` with its `list` and `build` subcommands."""
    from moe_nnunet.datasets import DATASETS

    parser = subparsers.add_parser("datasets", help="list or build the bundled raw nnU-Net datasets",
                                   description="Build small raw nnU-Net v2 datasets: a synthetic multi-channel "
                                               "phantom, or real-derived data from files inside PyPI packages.")
    sub = parser.add_subparsers(dest="datasets_command", metavar="{list,build}")
    p_list = sub.add_parser("list", help="table of datasets: name, default id, real/synthetic, description")
    p_list.set_defaults(func=_list)

    p_build = sub.add_parser("build", help="write one dataset to nnUNet_raw; prints the folder written")
    p_build.add_argument("name", choices=sorted(DATASETS), help="dataset to build")
    p_build.add_argument("--id", type=int, default=None,
                         help="nnU-Net dataset id (default: " +
                              ", ".join(f"{n} {s.default_id}" for n, s in DATASETS.items()) + ")")
    p_build.add_argument("--raw", default=None, help="output root (default: $nnUNet_raw)")
    p_build.add_argument("--num_cases", type=int, default=None, help="number of cases (default: the builder's, 10 or 20)")
    p_build.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    p_build.set_defaults(func=_build)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
