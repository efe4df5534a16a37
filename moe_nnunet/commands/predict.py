"""`moe_nnunet predict`: nnUNetv2_predict's arguments and defaults, plus prediction with missing modalities."""
from __future__ import annotations

import argparse
import os
import sys


def _default(env: str, fallback: int) -> int:
    value = os.environ.get(env)
    return int(value) if value and value.isdigit() else fallback


def run(args: argparse.Namespace) -> int:
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from moe_nnunet.discovery import ensure_ext_trainer_env
    from moe_nnunet.evaluation.model_folder import ModelFolderError, UnreadableCheckpointError, check_model_folder
    from moe_nnunet.evaluation.predict import BadInputError, MissingModalityPredictor, predict_with_missing

    ensure_ext_trainer_env()
    if args.part_id >= args.num_parts:
        print(f"moe_nnunet predict: -part_id {args.part_id} must be below -num_parts {args.num_parts}.",
              file=sys.stderr)
        return 2
    folds = [f if f == "all" else int(f) for f in args.f]
    try:
        model_folder = check_model_folder(args.d, args.tr, args.p, args.c, folds, args.chk)
    except (ModelFolderError, UnreadableCheckpointError) as e:
        print(f"moe_nnunet predict: error: {e}", file=sys.stderr)
        return 1
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    elif args.device == "cuda":
        torch.set_num_threads(1)
    predictor = MissingModalityPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                         use_mirroring=not args.disable_tta,
                                         perform_everything_on_device=not args.not_on_device,
                                         device=torch.device(args.device), verbose=args.verbose,
                                         verbose_preprocessing=args.verbose,
                                         allow_tqdm=not args.disable_progress_bar)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    trainer_class = recursive_find_trainer_class_by_name(predictor.trainer_name)
    try:
        predict_with_missing(predictor, trainer_class, args.i, args.o, missing=args.missing,
                             zero_fill=args.zero_fill, save_probabilities=args.save_probabilities,
                             existing="overwrite" if args.overwrite else
                             "continue" if args.continue_prediction else "refuse",
                             allow_nonfinite=args.allow_nonfinite, num_processes_preprocessing=args.npp,
                             num_processes_segmentation_export=args.nps,
                             folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                             num_parts=args.num_parts, part_id=args.part_id)
    except BadInputError as e:
        print(f"moe_nnunet predict: error: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="nnUNetv2_predict that also predicts cases with a modality missing",
        description="Predict with a trained nnU-Net model folder, as nnUNetv2_predict (same arguments and "
                    "defaults: sliding window, mirroring, ensemble of folds). Cases whose channel file is absent "
                    "from -i, and all cases for the channels named by --missing, are predicted without those "
                    "channels: M4oE models mask their experts, nnUNetTrainerChannelDropout models zero-fill "
                    "them; other models refuse unless --zero_fill is given. Every input file is checked before "
                    "anything is written (complete gzip, readable, finite values, one grid per case), existing "
                    "predictions are refused unless --overwrite or --continue_prediction, and each prediction is "
                    "written under a temporary name and renamed when complete.")
    p.add_argument("-i", required=True, help="input folder (CASE_XXXX.nii.gz files, one per channel)")
    p.add_argument("-o", required=True, help="output folder (created if needed)")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer class (default nnUNetTrainer)")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to ensemble (default 0 1 2 3 4)")
    p.add_argument("--missing", nargs="+", default=[], metavar="NAME",
                   help="channels (names from dataset.json, or indices) to treat as missing in every case")
    p.add_argument("--zero_fill", action="store_true",
                   help="zero-fill missing channels even for models not trained for it")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true", help="also write .npz probabilities")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace existing predictions in -o (by default they are refused, with their list)")
    existing.add_argument("--continue_prediction", action="store_true",
                          help="predict only the cases without a complete prediction in -o (an empty or "
                               "unreadable one is predicted again)")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="set NaN and inf voxels to 0, with a note per file (by default such files are refused)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-npp", type=int, default=_default("nnUNet_npp", 3), help="preprocessing processes (default 3)")
    p.add_argument("-nps", type=int, default=_default("nnUNet_nps", 3), help="export processes (default 3)")
    p.add_argument("-prev_stage_predictions", default=None, help="previous stage's predictions (cascade)")
    p.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts")
    p.add_argument("-part_id", type=int, default=0, help="which part this call predicts")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device (default cuda)")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true", help="keep the whole-case arrays off the GPU")
    p.set_defaults(func=run)
