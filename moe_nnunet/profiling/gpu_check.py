"""Helpers of `scripts/gpu_check.sh`, the one call that checks on a CUDA GPU what the CPU tests cannot.

    python moe_nnunet/profiling/gpu_check.py record OUT STEP STATUS SECONDS [--rc N] [--log FILE] [--model DIR]
                                                                             [--json FILE] [--note TEXT]
    python moe_nnunet/profiling/gpu_check.py report OUT --mode gpu|cpu-dry-run [--device NAME] [--budget S]
    python -m torch.distributed.run --standalone --nproc_per_node 1 -m moe_nnunet.profiling.gpu_check ddp_train \\
        DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS [--launcher_only]

`record` and `report` use the standard library only, so that they also run by path with any Python 3 when the
environment could not be set up (the `setup` step failed). `record` keeps one step's outcome in OUT/steps/;
`report` reads the figures of each step from its log and outputs (seconds per epoch, ms per training step, model
FLOP utilisation, the sliding-window ratio), prints one table, writes OUT/gpu_check.json, and exits 1 unless every
step passed. `ddp_train` is what torchrun starts: nnU-Net's own DDP entry (`nnunetv2.run.run_training.run_ddp`, what
`nnUNetv2_train -num_gpus N` spawns for N > 1) with torchrun's rank and world size, so that one GPU runs nnU-Net's
DDP path at world size 1; `nnUNetv2_train -num_gpus 1` would train without DDP.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["STEPS", "record", "figures", "report", "ddp_train"]

# (name, what it checks), in the order the script runs them and the table lists them
STEPS = (
    ("setup", "environment: moe_nnunet, nnU-Net and torch importable"),
    ("prepare", "phantom dataset, nnU-Net's and our plans, preprocessing"),
    ("train_m4oe", "(a) nnUNetv2_train M4oE, 3d_fullres, nnU-Net's defaults"),
    ("train_nnunet", "(a) nnUNetv2_train nnU-Net's network (2nd expert)"),
    ("train_ddp", "(b) M4oE through nnU-Net's DDP path, torchrun"),
    ("merge", "moe_nnunet merge: M4oE + nnU-Net's network"),
    ("train_merged", "(a) nnUNetv2_train the merged model's gate"),
    ("bench_eager", "(c) moe_nnunet bench, eager"),
    ("bench_compiled", "(c) moe_nnunet bench, torch.compile"),
    ("sliding_window", "(d) sliding window over one whole case"),
)
WHAT = max(len(what) for _, what in STEPS) + 2  # width of the table's "what" column
STATUSES = ("pass", "fail", "timeout", "skipped", "not run")
TRAININGS = ("train_m4oe", "train_nnunet", "train_ddp", "train_merged")
BENCHES = ("bench_eager", "bench_compiled", "sliding_window")


def record(out: Path, step: str, status: str, seconds: float, rc: int | None = None, log: str | None = None,
           model: str | None = None, json_path: str | None = None, note: str | None = None) -> None:
    """Keep one step's outcome in OUT/steps/STEP.json (one file per step: steps may run side by side)."""
    if step not in dict(STEPS):
        raise ValueError(f"unknown step {step!r}; the steps are {', '.join(dict(STEPS))}")
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
    folder = out / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"status": status, "seconds": round(float(seconds), 1), "rc": rc, "log": log, "model": model,
             "json": json_path, "note": note}
    (folder / f"{step}.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")


def _read(path: str | None) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""


def _training_figures(entry: dict[str, Any]) -> dict[str, Any]:
    """From nnUNetv2_train's output: each epoch's time, the defaults in force (the check's trainers print them in
    a `gpu_check:` line), DDP's world size, and the final validation's mean foreground Dice."""
    log = _read(entry.get("log"))
    found: dict[str, Any] = {}
    epochs = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    if epochs:
        # the last epoch runs compiled and past the expert curriculum's switch: the steady state
        found.update(epochs=len(epochs), epoch_s=epochs, s_per_epoch=epochs[-1])
    settings = re.findall(r"gpu_check: (.*)", log)
    if settings:
        for key, value in re.findall(r"(\w+)=(\S+)", settings[-1]):
            found[key] = int(value) if key == "ddp_world_size" else {"True": True, "False": False}.get(value, value)
    world = re.findall(r"The world size is (\d+)", log)
    if world:
        found["nnunet_ddp_world_size"] = int(world[-1])
    launcher = re.findall(r"\[ddp\] rank (\d+) of world size (\d+), backend (\w+)", log)
    if launcher:
        found.update(torchrun_world_size=int(launcher[-1][1]), backend=launcher[-1][2])
    if entry.get("model"):
        try:
            summary = json.loads(_read(str(Path(entry["model"]) / "validation" / "summary.json")))
            found["dice"] = round(float(summary["foreground_mean"]["Dice"]), 4)
        except (ValueError, KeyError, TypeError):
            pass
    return found


def _bench_figures(step: str, entry: dict[str, Any]) -> dict[str, Any]:
    """From `moe_nnunet bench --json`: ours and nnU-Net's network side by side."""
    try:
        result = json.loads(_read(entry.get("json")))
        ours, base = result["networks"]["ours"], result["networks"]["baseline"]
    except (ValueError, KeyError, TypeError):
        return {}
    keys = ("sliding_window_ms",) if step == "sliding_window" else \
        ("train_ms", "inference_ms", "train_mfu", "inference_mfu", "train_memory_mib",
         "simulated_train_memory_mib_over_measured")
    found: dict[str, Any] = {}
    for key in keys:
        for name, net in (("ours", ours), ("nnunet", base)):
            if net.get(key) is not None:
                found[f"{name}_{key}"] = round(float(net[key]), 3)
    ratio = result.get("ratios", {}).get("sliding_window_ms" if step == "sliding_window" else "train_ms")
    if ratio is not None:
        found["ratio"] = round(float(ratio), 3)
    found["device"] = result.get("device", {}).get("name")
    if step != "sliding_window":
        found["compile"] = result.get("setup", {}).get("compile")
    return found


def figures(step: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The figures of one recorded step, read from its log and outputs."""
    if step in TRAININGS:
        return _training_figures(entry)
    if step in BENCHES:
        return _bench_figures(step, entry)
    return {}


def _judge(step: str, status: str, found: dict[str, Any], mode: str) -> tuple[str, str | None]:
    """A step that exited 0 without doing what it checks fails (on a GPU: nnU-Net's defaults, the DDP path)."""
    if status != "pass":
        return status, None
    if step in TRAININGS and (step != "train_ddp" or mode == "gpu"):  # the dry run's DDP step trains nothing
        if not found.get("epochs"):
            return "fail", "no epoch finished (no 'Epoch time' in the log)"
    if mode != "gpu":
        return status, None
    if step in TRAININGS and not (found.get("compile") and found.get("grad_scaler")):
        return "fail", "nnU-Net's defaults were not in force (torch.compile and fp16 GradScaler expected on CUDA)"
    if step == "train_ddp" and found.get("ddp_world_size") != 1:
        return "fail", "the trainer did not run under DDP at world size 1: the DDP path did not run"
    if step == "bench_compiled" and not found.get("compile"):
        return "fail", "the benchmark did not compile"
    return status, None


def _summary(step: str, found: dict[str, Any]) -> str:
    """One table cell of figures."""
    def number(value: float, digits: int = 1) -> str:
        return f"{value:,.{digits}f}"

    parts = []
    if "s_per_epoch" in found:
        parts.append(f"{number(found['s_per_epoch'])} s/epoch (epochs: "
                     + ", ".join(number(t) for t in found["epoch_s"]) + ")")
    if "dice" in found:
        parts.append(f"Dice {found['dice']:.3f}")
    if step in TRAININGS and "compile" in found:
        parts.append(f"compile {'on' if found['compile'] else 'off'}, GradScaler {'on' if found.get('grad_scaler') else 'off'}")
    if found.get("ddp_world_size"):
        parts.append(f"DDP world size {found['ddp_world_size']}")
    elif "torchrun_world_size" in found:
        parts.append(f"torchrun world size {found['torchrun_world_size']} ({found.get('backend')}), launcher only")
    key = "sliding_window_ms" if step == "sliding_window" else "train_ms"
    if f"ours_{key}" in found:
        what = "whole case" if step == "sliding_window" else "train step"
        parts.append(f"{what} ms: ours {number(found[f'ours_{key}'])} / nnU-Net "
                     f"{number(found.get(f'nnunet_{key}', float('nan')))} = {found.get('ratio', float('nan')):.2f}x")
    if "ours_train_mfu" in found:
        parts.append(f"MFU ours {100 * found['ours_train_mfu']:.1f} %, nnU-Net "
                     f"{100 * found.get('nnunet_train_mfu', float('nan')):.1f} %")
    return "; ".join(parts)


def report(out: Path, mode: str, device: str | None = None, budget: float | None = None,
           wall: float | None = None) -> int:
    """Print the table of every step, write OUT/gpu_check.json; 0 when every step passed, else 1."""
    steps = []
    for name, what in STEPS:
        path = out / "steps" / f"{name}.json"
        entry = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else \
            {"status": "not run", "seconds": None, "rc": None, "log": None, "note": "the script stopped before it"}
        found = figures(name, entry)
        status, why = _judge(name, entry["status"], found, mode)
        note = "; ".join(n for n in (entry.get("note"), why) if n) or None
        steps.append({"name": name, "what": what, "status": status, "seconds": entry.get("seconds"),
                      "rc": entry.get("rc"), "log": entry.get("log"), "note": note, "figures": found})
    passed = all(s["status"] == "pass" for s in steps)
    result = {"mode": mode, "device": device, "budget_s": budget, "wall_s": wall, "passed": passed, "steps": steps}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    width = max(len(name) for name, _ in STEPS) + 2
    lines = [f"moe_nnunet GPU check ({mode}) on {device or 'unknown device'}"
             + (f", {wall:.0f} s of a {budget:.0f} s budget" if wall is not None and budget else ""),
             f"{'step':{width}}{'status':9}{'seconds':>8}  {'what':{WHAT}}figures"]
    for s in steps:
        seconds = "" if s["seconds"] is None else f"{s['seconds']:.1f}"
        lines.append(f"{s['name']:{width}}{s['status']:9}{seconds:>8}  {s['what']:{WHAT}}{_summary(s['name'], s['figures'])}")
    lines.append("")
    for s in steps:
        log = f"log: {s['log']}" if s["status"] != "pass" and s["log"] else None
        if s["note"] or log:
            lines.append(f"{s['name']}: " + "; ".join(n for n in (s["note"], log) if n))
    counts = {status: sum(s["status"] == status for s in steps) for status in STATUSES}
    lines.append(f"{'PASSED' if passed else 'FAILED'}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
                 + f"; details in {out / 'gpu_check.json'}")
    print("\n".join(lines))
    return 0 if passed else 1


def ddp_train(argv: list[str]) -> int:
    """nnU-Net's DDP training entry in a process that torchrun started (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="gpu_check ddp_train",
                                     description="nnUNetv2_train through nnU-Net's DDP path, under torchrun")
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold")
    parser.add_argument("-tr", required=True, help="trainer")
    parser.add_argument("-p", required=True, help="plans identifier")
    parser.add_argument("--launcher_only", action="store_true",
                        help="CPU dry run: form torchrun's process group (gloo), find the trainer, and stop; nnU-Net's "
                             "DDP trainer needs CUDA and NCCL")
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error("start it with torchrun (python -m torch.distributed.run --nproc_per_node N -m "
                     "moe_nnunet.profiling.gpu_check ddp_train ...): RANK and WORLD_SIZE are not set")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.launcher_only:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        dist.init_process_group("gloo")
        trainer = recursive_find_trainer_class_by_name(args.tr)
        print(f"[ddp] rank {dist.get_rank()} of world size {dist.get_world_size()}, backend gloo: torchrun's process "
              f"group formed, trainer {trainer.__name__} found; nnU-Net's DDP trainer needs CUDA (NCCL) and is not "
              f"started in a dry run", flush=True)
        dist.destroy_process_group()
        return 0
    from nnunetv2.run.run_training import run_ddp
    # as nnUNetv2_train on CUDA: one thread per process (nnU-Net's data augmentation runs in its own workers)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    print(f"[ddp] rank {rank} of world size {world}, backend nccl: nnU-Net's run_ddp", flush=True)
    fold = args.fold if args.fold == "all" else int(args.fold)
    run_ddp(rank, args.dataset, args.configuration, fold, args.tr, args.p, False, False, False, None, False, False,
            world)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ddp_train"]:
        return ddp_train(argv[1:])
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="keep one step's outcome")
    rec.add_argument("out", type=Path)
    rec.add_argument("step")
    rec.add_argument("status")
    rec.add_argument("seconds", type=float)
    rec.add_argument("--rc", type=int)
    rec.add_argument("--log")
    rec.add_argument("--model", help="the trained fold's folder (its validation/summary.json)")
    rec.add_argument("--json", dest="json_path", help="the step's JSON output (moe_nnunet bench --json)")
    rec.add_argument("--note")
    rep = sub.add_parser("report", help="the table of every step, OUT/gpu_check.json; exit 1 unless all passed")
    rep.add_argument("out", type=Path)
    rep.add_argument("--mode", choices=("gpu", "cpu-dry-run"), required=True)
    rep.add_argument("--device")
    rep.add_argument("--budget", type=float)
    rep.add_argument("--wall", type=float)
    sub.add_parser("ddp_train", help="(under torchrun) nnU-Net's DDP training entry")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.out, args.step, args.status, args.seconds, args.rc, args.log, args.model, args.json_path, args.note)
        return 0
    return report(args.out, args.mode, args.device, args.budget, args.wall)


if __name__ == "__main__":
    sys.exit(main())
