"""`moe_nnunet plan`: run one of our planners through nnU-Net's planning API."""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path


def _dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)
    except RuntimeError as e:
        raise SystemExit(f"moe_nnunet plan: {e}\nCheck -d and that nnUNet_raw / nnUNet_preprocessed point to "
                         f"your nnU-Net folders.")


def _default_plans_name(planner: type) -> str:
    return inspect.signature(planner.__init__).parameters["plans_name"].default


def run(args: argparse.Namespace) -> int:
    from moe_nnunet.planners import PLANNERS
    if args.pl not in PLANNERS:
        print(f"moe_nnunet plan: unknown planner '{args.pl}'. Available planners: {', '.join(PLANNERS)}",
              file=sys.stderr)
        return 2
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            print(f"moe_nnunet plan: the environment variable {var} is not set; set it as for nnU-Net "
                  f"(see nnU-Net's documentation/set_environment_variables.md).", file=sys.stderr)
            return 2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    from moe_nnunet.workflow.integrity import BadInputError, verify_raw_dataset
    from moe_nnunet.workflow.plans_files import PlansFileError, nothing_new_on_failure, plans_target

    planner = PLANNERS[args.pl]
    for dataset in args.d:
        name = _dataset_name(dataset)
        dataset_id = convert_dataset_name_to_id(name)
        folder = Path(nnUNet_preprocessed) / name
        try:
            plans_target(folder, args.overwrite_plans_name or _default_plans_name(planner), args.overwrite,
                         "-overwrite_plans_name")
            if not args.no_verify:
                print(f"Checking {name} (nnU-Net's verify_dataset_integrity and moe_nnunet's file checks; "
                      f"--no_verify skips them)")
                verify_raw_dataset(Path(nnUNet_raw) / name, args.np)
        except PlansFileError as e:
            print(f"moe_nnunet plan: error: {e}", file=sys.stderr)
            return 1
        except BadInputError as e:
            print(f"moe_nnunet plan: error: {e}\n(--no_verify skips these checks; nnU-Net would then plan and "
                  f"train on the files as its readers see them)", file=sys.stderr)
            return 1
        with nothing_new_on_failure(folder):
            if not (folder / "dataset_fingerprint.json").is_file():
                print(f"No fingerprint for {name} yet: extracting it (as nnUNetv2_extract_fingerprint -d {dataset_id})")
                extract_fingerprint_dataset(dataset_id, num_processes=args.np, check_dataset_integrity=False)
            kwargs = {}
            if args.overwrite_plans_name:
                kwargs["overwrite_plans_name"] = args.overwrite_plans_name
            _, plans_name = plan_experiment_dataset(dataset_id, planner,
                                                    gpu_memory_target_in_gb=args.gpu_memory_target, **kwargs)
        print(f"\nPlans written: {folder / (plans_name + '.json')}\nNext:\n"
              f"  nnUNetv2_preprocess -d {dataset_id} -plans_name {plans_name} -c 3d_fullres\n"
              f"  export nnUNet_extTrainer=$(moe_nnunet trainer_path)\n"
              f"  nnUNetv2_train {dataset_id} 3d_fullres 0 -tr nnUNetTrainerM4oE -p {plans_name} --npz\n"
              f"(use -c 2d for the 2d configuration; folds 0-4 for cross-validation)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan M4oE experiments (after or instead of nnUNetv2_extract_fingerprint)",
                       description="Run a moe_nnunet planner through nnU-Net's planning API and write "
                                   "<plans_name>.json to nnUNet_preprocessed. First checks the raw dataset (one file "
                                   "per channel and a label per case, complete gzip files, finite values, one grid "
                                   "per case, then nnU-Net's verify_dataset_integrity), extracts the fingerprint if "
                                   "it is missing, and refuses to replace existing plans unless --overwrite. "
                                   "Nothing is left behind when a step fails.")
    p.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    p.add_argument("-pl", default="M4oEPlanner", help="planner class (default M4oEPlanner)")
    p.add_argument("-gpu_memory_target", type=float, default=None,
                   help="GPU memory target in GB (default: the planner's, 8)")
    p.add_argument("-overwrite_plans_name", default=None,
                   help="plans identifier (default nnUNetM4oEPlans; never nnU-Net's own nnUNetPlans)")
    p.add_argument("-np", type=int, default=2, help="processes for the checks and fingerprint extraction (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing plans of that name (refused otherwise)")
    p.add_argument("--no_verify", action="store_true", help="skip the dataset checks")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="(the default now; kept so that older command lines still run)")
    p.set_defaults(func=run)
