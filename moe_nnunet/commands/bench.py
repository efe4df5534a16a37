"""`moe_nnunet bench`: our network against nnU-Net's own networks (and MONAI's SwinUNETR), measured in one run.

The measuring itself lives in `moe_nnunet.profiling`; this module only parses arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["register", "run", "command_line"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time, size and count FLOPs of our network against nnU-Net's on the same input",
        description="Measure our M4oE network and nnU-Net's network side by side, alternating steps: training "
                    "step and inference time, peak memory, parameters, FLOPs and the planner's memory "
                    "estimate. Give a preprocessed dataset (-d, -c) or use --synthetic.")
    data = parser.add_argument_group("what to build")
    data.add_argument("-d", "--dataset", help="dataset name or id (with its plans in nnUNet_preprocessed)")
    data.add_argument("-c", "--configuration", help="configuration, e.g. 3d_fullres")
    data.add_argument("-p", "--plans", default="nnUNetM4oEPlans", help="our plans name (default: %(default)s)")
    data.add_argument("--baseline_plans", default="nnUNetPlans",
                      help="nnU-Net's plans to compare with (default: %(default)s); when the file or the "
                           "configuration is missing, PlainConvUNet with our plans' stages is used")
    data.add_argument("--synthetic", action="store_true",
                      help="no dataset: both networks from nnU-Net's default topology for --patch_size "
                           "(defaults: 4 channels, 128 128 128, batch 2, 3 outputs)")
    data.add_argument("--patch_size", type=int, nargs="+", metavar="N", help="override the patch size")
    data.add_argument("--batch_size", type=int, help="override the batch size")
    data.add_argument("--channels", type=int, help="override the number of input channels (one expert each)")
    data.add_argument("--num_classes", type=int, default=3, help="outputs in --synthetic mode (default: 3)")
    data.add_argument("--references", nargs="*", default=["resenc_m", "swinunetr"], metavar="NAME",
                      help="reference networks measured too: resenc_m (nnU-Net's ResEnc M), swinunetr (MONAI's "
                           "SwinUNETR-48, skipped when MONAI is missing or the patch is not a multiple of 32); "
                           "none for only ours and the baseline (default: resenc_m swinunetr)")
    data.add_argument("--ours_arch", metavar="JSON",
                      help="a variant of our network: JSON object of architecture kwargs to replace, e.g. "
                           "'{\"n_conv_per_stage\": [1, 2, 2, 2, 2, 2]}'")
    how = parser.add_argument_group("how to measure")
    how.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    how.add_argument("--iterations", type=int, default=10, help="measured steps per network (default: 10)")
    how.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default: 3)")
    how.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    how.add_argument("--compile", action="store_true", help="torch.compile both networks (CUDA)")
    how.add_argument("--peak_tflops", type=float, metavar="T",
                     help="the device's peak TFLOP/s for this precision; adds model FLOP utilisation rows")
    how.add_argument("--no_memory", action="store_true",
                     help="CPU: skip the extra process per network that measures peak memory")
    how.add_argument("--case_size", type=int, nargs="+", metavar="N",
                     help="also time nnU-Net's sliding-window prediction (nnUNetPredictor) of one whole case of "
                          "this size with each network, e.g. 256 256 256")
    how.add_argument("--case_repeats", type=int, default=3,
                     help="measured sliding-window predictions per network, after one warm-up (default: 3)")
    how.add_argument("--no_mirroring", action="store_true",
                     help="sliding window without test-time mirroring (nnUNetv2_predict --disable_tta)")
    how.add_argument("--simulate", action="store_true",
                     help="time nothing and allocate nothing: parameters, FLOPs, the training step's peak memory "
                          "(simulated on fake tensors, as on a GPU) and the planner's estimate; seconds per "
                          "network even at 128^3 on a CPU")
    how.add_argument("--json", metavar="OUT.json", help="write every figure, versions and the command here")
    parser.set_defaults(func=run)


def command_line(args: argparse.Namespace, device: str) -> str:
    """The full command with every effective option, so that a result can be reproduced exactly."""
    words = ["moe_nnunet", "bench"]
    if args.synthetic:
        words.append("--synthetic")
    else:
        words += ["-d", str(args.dataset), "-c", args.configuration, "-p", args.plans,
                  "--baseline_plans", args.baseline_plans]
    for option in ("channels", "batch_size"):
        if getattr(args, option) is not None:
            words += [f"--{option}", str(getattr(args, option))]
    if args.patch_size:
        words += ["--patch_size", *map(str, args.patch_size)]
    if args.synthetic:
        words += ["--num_classes", str(args.num_classes)]
    if args.ours_arch:
        words += ["--ours_arch", args.ours_arch]
    words += ["--references", *(_references(args) or ["none"])]
    if not args.simulate:
        words += ["--device", device, "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    words += [f"--{flag}" for flag in ("bf16", "compile", "no_memory", "simulate") if getattr(args, flag)]
    if args.peak_tflops:
        words += ["--peak_tflops", f"{args.peak_tflops:g}"]
    if args.case_size and not args.simulate:
        words += ["--case_size", *map(str, args.case_size), "--case_repeats", str(args.case_repeats)]
        if args.no_mirroring:
            words.append("--no_mirroring")
    if args.json:
        words += ["--json", args.json]
    return shlex.join(words)


def _references(args: argparse.Namespace) -> list[str]:
    return [] if args.references in ([], ["none"]) else list(args.references)


def _json_object(text: str) -> dict:
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--ours_arch {text!r} is not JSON ({e}); write e.g. "
                         "'{\"n_conv_per_stage\": [1, 2, 2, 2, 2, 2]}'.") from None
    if not isinstance(value, dict):
        raise ValueError(f"--ours_arch {text!r}: give a JSON object of architecture kwargs.")
    return value


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_nnunet import profiling

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.synthetic:
            setup = profiling.synthetic_setup(args.channels or 4, args.patch_size or (128, 128, 128),
                                              args.batch_size or 2, args.num_classes)
        else:
            if args.dataset is None or args.configuration is None:
                print("moe_nnunet bench: error: give -d DATASET and -c CONFIGURATION, or --synthetic",
                      file=sys.stderr)
                return 2
            setup = profiling.plans_setup(args.dataset, args.configuration, args.plans, args.baseline_plans,
                                          args.patch_size, args.batch_size, args.channels)
        if args.ours_arch:
            profiling.override_ours(setup, _json_object(args.ours_arch))
        profiling.add_references(setup, _references(args))
        result = profiling.run_benchmark(
            setup, device, args.iterations, args.warmup, args.bf16, args.compile, not args.no_memory,
            command_line(args, device), progress=lambda message: print(f"[bench] {message}", file=sys.stderr),
            peak_tflops=args.peak_tflops, simulate=args.simulate, case_size=args.case_size,
            case_repeats=args.case_repeats, mirroring=not args.no_mirroring)
    except ValueError as e:
        print(f"moe_nnunet bench: error: {e}", file=sys.stderr)
        return 2
    print(profiling.format_report(result))
    if args.json:
        profiling.write_json(result, args.json)
        print(f"\nwritten: {args.json}")
    return 0
