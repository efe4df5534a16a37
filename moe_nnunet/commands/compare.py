"""`moe_nnunet compare`: nnU-Net, nnU-Net with channel dropout and M4oE trained to a plateau on equal budgets, then
evaluated with each modality removed."""
from __future__ import annotations

import argparse
import sys


# --models: a short key per row of moe_nnunet.evaluation.equal_budget.MODELS
MODEL_KEYS = {"nnunet": "nnU-Net", "dropout": "nnU-Net + channel dropout", "m4oe": "M4oE",
              "one_expert": "M4oE, 1 expert, no dropout (sanity)"}


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.evaluation.compare import CompareError, comparison_table, run_compare
    from moe_nnunet.evaluation.curves import verdict_words
    from moe_nnunet.workflow.steps import StepFailed

    try:
        models = None if args.models is None else [MODEL_KEYS[k] for k in args.models]
        report = run_compare(args.d, args.o, iterations=args.iterations, epoch_iterations=args.epoch_iterations,
                             val_iterations=args.val_iterations, max_features=args.max_features,
                             batch_size=args.batch_size, device=args.device, num_cases=args.num_cases,
                             models=models)
    except (CompareError, StepFailed, ValueError, FileNotFoundError) as e:
        print(f"moe_nnunet compare: error: {e}", file=sys.stderr)
        return 1
    print()
    for model, m in report["models"].items():
        v = m["plateau"]
        verdict = verdict_words(v).upper() if v["plateaued"] is False else verdict_words(v)
        rise = "" if v["rise"] is None else f" (last quarter {v['last_quarter']:.3f}, rise {v['rise']:+.3f})"
        print(f"[compare] {model}: {verdict}{rise}")
    print("\n" + comparison_table(report))
    print(f"written: {args.o}/comparison.json, comparison.md, curves.png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train nnU-Net, nnU-Net + channel dropout and M4oE to a plateau on one "
                                       "budget (2d) and compare them with each modality removed",
                       description="For a dataset (an nnU-Net id or name, or a registered builder such as "
                                   "brats_phantom, built into OUT), run nnU-Net's 2d planning and preprocessing and "
                                   "moe_nnunet plan, write narrowed plans for all models alike, train fold 0 of "
                                   "nnU-Net, nnU-Net with channel dropout, M4oE and M4oE with one expert (sanity) "
                                   "one after another with the same iteration budget, judge whether each "
                                   "validation Dice curve has plateaued, and predict the held-out cases with the "
                                   "full input and with each modality removed. Writes comparison.json, "
                                   "comparison.md and curves.png. Run it again to resume.")
    p.add_argument("-d", required=True, help="dataset id or name, or a registered builder (moe_nnunet datasets list)")
    p.add_argument("-o", required=True, help="output folder (also nnU-Net's folders when -d is a builder)")
    p.add_argument("--iterations", type=int, default=800,
                   help="training iterations per model (default 800: where nnU-Net's 2d network plateaus on an 80x80 "
                        "4-channel dataset at batch 12)")
    p.add_argument("--epoch_iterations", type=int, default=20,
                   help="training iterations per epoch, i.e. per point of the validation curve (default 20)")
    p.add_argument("--val_iterations", type=int, default=5,
                   help="validation batches per epoch behind each point of the curve (default 5)")
    p.add_argument("--max_features", type=int, default=64,
                   help="cap on the features per stage of every network (default 64)")
    p.add_argument("--batch_size", type=int, default=12, help="batch size of every model (default 12)")
    p.add_argument("--num_cases", type=int, default=None, help="cases to build (builders only; default theirs)")
    p.add_argument("--models", nargs="+", choices=list(MODEL_KEYS), default=None,
                   help="train and compare only these models (default all: " + ", ".join(
                       f"{k} = {v}" for k, v in MODEL_KEYS.items()) + "); the sanity line needs nnunet and "
                       "one_expert")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"], help="device (default cpu)")
    p.set_defaults(func=run)
