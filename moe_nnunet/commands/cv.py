"""`moe_nnunet cv`: the folds of a cross-validation and nnU-Net's best-configuration step, here or on SLURM."""
from __future__ import annotations

import argparse
import shutil
import sys


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.discovery import ensure_ext_trainer_env
    from moe_nnunet.workflow import cv

    ensure_ext_trainer_env()
    try:
        runs = [cv.FoldRun(args.d, c, str(f), args.tr, args.p) for c in args.c for f in args.folds]
        runs[0].output_folder()  # the dataset must exist
        numbered = sorted({r.fold for r in runs if r.fold != "all"})
        models = cv.best_models(args.c, args.tr, args.p, args.others)
    except (RuntimeError, ValueError) as e:
        print(f"moe_nnunet cv: error: {e}", file=sys.stderr)
        return 1
    find_best = not args.no_best and len(numbered) > 1
    if args.best_only:
        return _find_best(args.d, models, numbered)
    if args.launcher == "slurm":
        return _slurm(args, runs, numbered if find_best else None)
    failed = cv.run_local(runs, args.device, args.train_args)
    if failed:
        names = ", ".join(f"{r.configuration} fold {r.fold}" for r in failed)
        print(f"moe_nnunet cv: error: {names} failed (see the training log in each fold folder); run the same "
              f"command again to resume them.", file=sys.stderr)
        return 1
    return _find_best(args.d, models, numbered) if find_best else 0


def _find_best(dataset: str, models: list[dict], folds: list[str]) -> int:
    from moe_nnunet.workflow import cv

    names = ", ".join(f"{m['trainer']}__{m['plans']}__{m['configuration']}" for m in models)
    print(f"moe_nnunet cv: best configuration of {names} over folds {' '.join(folds)}", flush=True)
    try:
        cv.find_best(dataset, models, folds)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"moe_nnunet cv: error: {e}\nEvery model needs all folds trained with --npz (moe_nnunet cv does).",
              file=sys.stderr)
        return 1
    return 0


def _slurm(args: argparse.Namespace, runs: list, best_folds: list[str] | None) -> int:
    from moe_nnunet.workflow import cv

    if shutil.which("sbatch") is None:
        print("moe_nnunet cv: error: sbatch not found; run this on a SLURM login node, or use --launcher local.",
              file=sys.stderr)
        return 1
    common = ["-d", args.d, "-tr", args.tr, "-p", args.p, "-device", args.device]
    best_args = None if best_folds is None else \
        ["-c", *args.c, "--folds", *best_folds] + (["--with", *args.others] if args.others else [])
    array, best = cv.write_slurm_scripts(runs, common, args.script_dir, args.sbatch, args.train_args, best_args)
    print(f"written: {array}" + (f", {best}" if best else ""))
    try:
        out = cv.submit_slurm(array, best, test_only=args.test_only)
    except RuntimeError as e:
        print(f"moe_nnunet cv: error: {e}", file=sys.stderr)
        return 1
    if args.test_only:
        print("\n".join(out))
    else:
        print(f"submitted: array job {out[0]} ({len(runs)} folds)" +
              (f", then job {out[1]} (best configuration, once the array has succeeded)" if best else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cv", help="train every fold (here, one per GPU, or as a SLURM job array), then find the best configuration",
        description="Cross-validation with nnU-Net's own programs: nnUNetv2_train for every configuration and "
                    "fold (--npz), then nnU-Net's find_best_configuration (cross-validation Dice of each model "
                    "and ensemble, postprocessing, inference_instructions.txt). Folds already finished are skipped, "
                    "stopped ones resume (--c), so the same command finishes an interrupted run. --launcher "
                    "local trains the folds in sequence, or one per visible GPU at a time; --launcher slurm "
                    "writes a job array (one fold per task) and a find-best job that runs after it succeeds, "
                    "and submits both with sbatch.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default 3d_fullres)")
    p.add_argument("-tr", default="nnUNetTrainerM4oE", help="trainer (default nnUNetTrainerM4oE)")
    p.add_argument("-p", default="nnUNetM4oEPlans", help="plans identifier (default nnUNetM4oEPlans)")
    p.add_argument("--folds", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device (default cuda)")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"], help="where the folds run")
    p.add_argument("--with", dest="others", nargs="+", default=[], metavar="TRAINER:PLANS[:CONFIG]",
                   help="other cross-validated models to compare and ensemble with in the best-configuration step, "
                        "e.g. --with nnUNetTrainer:nnUNetPlans (in each -c configuration)")
    p.add_argument("--no_best", action="store_true", help="train only; no best-configuration step")
    p.add_argument("--best_only", action="store_true", help="only the best-configuration step (folds trained)")
    p.add_argument("--script_dir", default="slurm_cv", help="slurm: folder for the job scripts and their logs "
                                                             "(default ./slurm_cv)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="slurm: an sbatch option for both jobs, written as --sbatch=--partition=gpu (repeat it: "
                        "--sbatch=--gres=gpu:1 --sbatch=--time=24:00:00)")
    p.add_argument("--test_only", action="store_true",
                   help="slurm: write the scripts and ask sbatch --test-only whether they would run; submit nothing")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                   help="everything after it goes to nnUNetv2_train (e.g. --train_args -num_gpus 2); must be last")
    p.set_defaults(func=run)
