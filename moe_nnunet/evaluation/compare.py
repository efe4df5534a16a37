"""`moe_nnunet compare`: nnU-Net, nnU-Net with channel dropout and M4oE trained to a plateau with equal budgets.

For one dataset and nnU-Net's 2d configuration: the stock planning and preprocessing, `moe_nnunet plan`, then
narrowed plans written for every model alike (`write_compare_plans`: features per stage capped, one batch size, the
same patch and the iteration budget); fold 0 of each model trained in turn by the stock `nnUNetv2_train`; the
per-epoch validation pseudo-Dice read from each checkpoint's log, plotted (`curves.png`) and judged by
`plateau_verdict`; then the held-out cases predicted with the full input and with each modality removed
(`moe_nnunet robustness`). Writes `comparison.json`, `comparison.md` and `curves.png`.

Every step is reused when its output exists; a stopped training continues with `--c`.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from moe_nnunet.datasets import DATASETS
from moe_nnunet.discovery import ext_trainer_dir
from moe_nnunet.evaluation.robustness import robustness_table

__all__ = ["MODELS", "CompareError", "plateau_verdict", "compare_plans", "write_compare_plans", "read_curves",
           "plot_curves", "comparison_table", "run_compare"]

CONFIGURATION = "2d"
NNUNET_PLANS, M4OE_PLANS = "nnUNetPlans_compare", "nnUNetM4oEPlans_compare"
ONE_EXPERT_PLANS = "nnUNetM4oEPlans_compare1Expert"
# (row name, trainer, plans): the models compared, every one on the same budget, data and patch
MODELS = (("nnU-Net", "nnUNetTrainer_compare", NNUNET_PLANS),
          ("nnU-Net + channel dropout", "nnUNetTrainerChannelDropout_compare", NNUNET_PLANS),
          ("M4oE", "nnUNetTrainerM4oE_compare", M4OE_PLANS),
          ("M4oE, 1 expert, no dropout (sanity)", "nnUNetTrainerM4oE1Expert_compare", ONE_EXPERT_PLANS))
PLATEAU_FRACTION, PLATEAU_TOLERANCE = 0.25, 0.01
PLATEAU_RULE = ("plateaued when the mean validation pseudo-Dice of the last 25 % of the epochs is less than 1 point "
                "above the mean of the 25 % before")


class CompareError(RuntimeError):
    """A step failed or the output folder holds models of another budget; the message says what to do."""


def plateau_verdict(dice: Sequence[float], fraction: float = PLATEAU_FRACTION,
                    tolerance: float = PLATEAU_TOLERANCE) -> dict:
    """Whether a per-epoch validation Dice curve has plateaued: the mean of the last `fraction` of the epochs
    exceeds the mean of the `fraction` before it by less than `tolerance`. Means of windows, not the last
    values, so that the noise of a few validation batches does not decide; nnU-Net's EMA would lag instead.

    Returns {"plateaued": bool or None (fewer than 8 epochs: too short to tell), "rise", "last_quarter",
    "previous_quarter", "rule"}.
    """
    values = [float(v) for v in dice]
    n = max(2, round(len(values) * fraction))
    if len(values) < 8:
        return {"plateaued": None, "rise": None, "last_quarter": None, "previous_quarter": None,
                "rule": f"{PLATEAU_RULE}; {len(values)} epochs are too few to tell"}
    last = sum(values[-n:]) / n
    previous = sum(values[-2 * n:-n]) / n
    rise = last - previous
    return {"plateaued": rise < tolerance, "rise": round(rise, 4), "last_quarter": round(last, 4),
            "previous_quarter": round(previous, 4), "rule": PLATEAU_RULE}


# --------------------------------------------------------------------------------------------------- plans


def _narrow(configuration: dict, max_features: int, batch_size: int, schedule: dict) -> dict:
    from moe_nnunet.trainers.compare import COMPARE_SCHEDULE_KEY

    configuration = copy.deepcopy(configuration)
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [min(int(f), max_features) for f in kwargs["features_per_stage"]]
    configuration["batch_size"] = batch_size
    configuration[COMPARE_SCHEDULE_KEY] = dict(schedule)
    return configuration


def compare_plans(preprocessed: Path, max_features: int, batch_size: int, schedule: dict) -> dict[str, dict]:
    """The three plans of the comparison, derived from nnU-Net's `nnUNetPlans.json` and `moe_nnunet plan`'s
    `nnUNetM4oEPlans.json` (both left as they are): the same 2d patch, strides, batch size and budget, widths
    capped at `max_features`. The M4oE networks are re-derived from the capped nnU-Net network by the planner's own
    rule (`m4oe_arch_kwargs`), one with the planner's experts, one with a single expert over all channels. Only the
    2d configuration is kept; it reads nnU-Net's preprocessed 2d data."""
    from moe_nnunet.networks.config import m4oe_arch_kwargs

    nnunet = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    m4oe = json.loads((preprocessed / "nnUNetM4oEPlans.json").read_text())
    if CONFIGURATION not in nnunet["configurations"]:
        raise CompareError(f"{preprocessed}/nnUNetPlans.json has no {CONFIGURATION} configuration")
    base = _narrow(nnunet["configurations"][CONFIGURATION], max_features, batch_size, schedule)
    channels = len(json.loads((preprocessed / "dataset.json").read_text())["channel_names"])
    planned = m4oe["configurations"][CONFIGURATION]["architecture"]
    plans = {}
    for name, experts, expert_names in (
            (NNUNET_PLANS, None, None),
            (M4OE_PLANS, planned["arch_kwargs"]["expert_channels"], planned["arch_kwargs"]["expert_names"]),
            (ONE_EXPERT_PLANS, [list(range(channels))], ["all_channels"])):
        configuration = copy.deepcopy(base)
        if experts is not None:
            arch = configuration["architecture"]
            arch["arch_kwargs"] = m4oe_arch_kwargs(configuration["patch_size"], arch["arch_kwargs"], channels,
                                                   expert_names, experts)
            arch["network_class_name"] = planned["network_class_name"]
            arch["_kw_requires_import"] = list(planned["_kw_requires_import"])
        p = copy.deepcopy(nnunet)
        p["plans_name"] = name
        p["configurations"] = {CONFIGURATION: configuration}
        plans[name] = p
    return plans


def write_compare_plans(preprocessed: Path, results: Path, max_features: int, batch_size: int,
                        schedule: dict) -> dict[str, dict]:
    """Write `compare_plans` as new plans files beside nnU-Net's. A plans file that would change while models
    trained with it exist is refused (they would mix budgets or widths)."""
    plans = compare_plans(preprocessed, max_features, batch_size, schedule)
    for name, p in plans.items():
        file = preprocessed / f"{name}.json"
        if file.is_file() and json.loads(file.read_text()) != p:
            trained = sorted(str(f) for f in results.glob(f"*__{name}__{CONFIGURATION}"))
            if trained:
                raise CompareError(f"{file} holds another budget or width than asked now, and {trained} were "
                                   f"trained with it. Use the earlier --iterations, --epoch_iterations, "
                                   f"--val_iterations, --max_features and --batch_size, or another -o.")
        file.write_text(json.dumps(p, indent=2))
    return plans


# --------------------------------------------------------------------------------------------------- curves


def read_curves(fold_folder: Path) -> dict | None:
    """Per-epoch validation pseudo-Dice (mean and per class), its EMA and epoch wall times, from nnU-Net's log in
    checkpoint_final.pth (else checkpoint_latest.pth); None before the first checkpoint."""
    from moe_nnunet.trainers.checkpointing import load_checkpoint_file

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold_folder / name).is_file():
            log = load_checkpoint_file(fold_folder / name, map_location="cpu")["logging"]
            break
    else:
        return None
    n = len(log["epoch_end_timestamps"])
    seconds = [float(e - s) for s, e in zip(log["epoch_start_timestamps"][:n], log["epoch_end_timestamps"])]
    return {"mean_fg_dice": [float(v) for v in log["mean_fg_dice"][:n]],
            "ema_fg_dice": [float(v) for v in log["ema_fg_dice"][:n]],
            "dice_per_class": [[float(x) for x in v] for v in log["dice_per_class_or_region"][:n]],
            "epoch_seconds": [round(s, 3) for s in seconds]}


def plot_curves(curves: dict[str, dict], epoch_iterations: int, title: str, output: Path) -> Path:
    """One PNG: each model's validation pseudo-Dice (thin) and its EMA (thick) over training iterations, and the
    wall time of each epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, (model, c) in enumerate(curves.items()):
        colour = f"C{i}"
        x = [(e + 1) * epoch_iterations for e in range(len(c["mean_fg_dice"]))]
        left.plot(x, c["mean_fg_dice"], color=colour, lw=0.8, alpha=0.5, marker="." if len(x) < 30 else None)
        left.plot(x, c["ema_fg_dice"], color=colour, lw=2.2, label=model)
        right.plot(range(1, len(c["epoch_seconds"]) + 1), c["epoch_seconds"], color=colour, lw=1.5, label=model)
    left.set(xlabel="training iterations", ylabel="validation pseudo-Dice (foreground mean)", ylim=(0, 1),
             title="pseudo-Dice per epoch (thin) and its EMA (thick)")
    right.set(xlabel="epoch", ylabel="seconds", title=f"wall time per epoch ({epoch_iterations} iterations + "
                                                      f"validation)")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


# --------------------------------------------------------------------------------------------------- table


def comparison_table(report: dict) -> str:
    """Markdown: the models (budget, speed, plateau), mean Dice with each modality removed, then per label."""
    s = report["schedule"]
    lines = [f"# Converged comparison on {report['dataset']} ({CONFIGURATION}, fold {report['fold']})", "",
             f"Every model: {s['num_epochs']} epochs x {s['num_iterations_per_epoch']} iterations = "
             f"{s['iterations']} iterations at batch {report['batch_size']}, patch "
             f"{'x'.join(map(str, report['patch_size']))}, widths capped at {report['max_features']} features, "
             f"validation pseudo-Dice from {s['num_val_iterations_per_epoch']} batch(es) per epoch, "
             f"device {report['device']}. "
             f"Plateau rule: {PLATEAU_RULE}.", "",
             "| model | trainer | plans | parameters | s / iteration | epochs | pseudo-Dice (last 25 %) | "
             "rise over the 25 % before | plateau |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for model, m in report["models"].items():
        v = m["plateau"]
        verdict = {True: "plateaued", False: "still rising", None: "too short to tell"}[v["plateaued"]]
        fmt = (lambda x: "" if x is None else f"{x:.3f}")
        lines.append(f"| {model} | `{m['trainer']}` | `{m['plans']}` | {m['parameters']:,} | "
                     f"{m['seconds_per_iteration']:.3f} | {m['epochs']} | {fmt(v['last_quarter'])} | "
                     f"{fmt(v['rise'])} | {verdict} |")
    results = report["robustness"]["results"]
    conditions = list(next(iter(results.values())))
    lines += ["", f"Mean Dice on the {len(report['held_out_cases'])} held-out cases, full input and each modality "
                  f"removed (M4oE masks the expert, the others get the channel zero-filled):", "",
              "| model | " + " | ".join(conditions) + " |", "|---|" + "---:|" * len(conditions)]
    for model, m in report["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{results[m['trainer']][c]['mean']:.3f}" for c in conditions)
                     + " |")
    sanity = report.get("sanity")
    if sanity:
        within = "within" if sanity["within_1_point"] else "NOT within"
        lines += ["", f"Sanity: M4oE with one expert over all channels and no dropout, full input "
                      f"{sanity['one_expert']:.3f} vs nnU-Net {sanity['nnunet']:.3f}: "
                      f"{sanity['difference_points']:+.1f} points ({within} 1 point)."]
    lines += ["", "Per label (columns are trainers):", "", robustness_table(report["robustness"]).strip()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- pipeline


class _Steps:
    """Runs console scripts of this environment with nnU-Net's folders in `env`, each step's output appended to
    logs/<step>.log, with a progress bar and one summary line."""

    def __init__(self, output: Path, env: dict) -> None:
        self.logs = output / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.seconds: dict[str, float] = {}

    def log(self, name: str) -> Path:
        return self.logs / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"

    def run(self, name: str, done: bool, *cmd: str, total: int | None = None,
            progress: Callable[[], int] | None = None) -> None:
        from tqdm import tqdm

        if done:
            print(f"[compare] {name}: already done, reused", flush=True)
            return
        log, start = self.log(name), time.time()
        with open(log, "a") as f, tqdm(total=total, desc=f"[compare] {name}", leave=False, file=sys.stdout,
                                       bar_format=None if total else "{desc}: {elapsed}") as bar:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT)
            while proc.poll() is None:
                time.sleep(1.0)
                if progress and total:
                    bar.update(min(progress(), total) - bar.n)
                else:
                    bar.refresh()
        self.seconds[name] = round(time.time() - start, 1)
        if proc.returncode != 0:
            raise CompareError(f"{name} failed (exit {proc.returncode}); the end of {log}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        print(f"[compare] {name}: done in {self.seconds[name]:.0f} s (log: {log})", flush=True)


def _epochs_logged(log: Path) -> Callable[[], int]:
    pattern = re.compile(r": Epoch (\d+)\s*$", re.MULTILINE)

    def count() -> int:
        try:
            return max((int(e) for e in pattern.findall(log.read_text(errors="replace"))), default=-1) + 1
        except FileNotFoundError:
            return 0
    return count


def _folders(dataset: str, output: Path, num_cases: int | None) -> tuple[Path, Path, Path, Path]:
    """(raw dataset folder, nnUNet_raw, nnUNet_preprocessed, nnUNet_results). A registered builder name is built
    into OUT/nnUNet_raw with nnU-Net's other folders beside it; a dataset id or name is looked up in the folders
    of the environment variables, as for nnU-Net's own commands."""
    from moe_nnunet.datasets import build_dataset

    if dataset in DATASETS:
        raw, pre, res = output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results"
        dataset_id = DATASETS[dataset].default_id
        found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
        if not found:
            print(f"[compare] building {dataset} into {raw} ...", flush=True)
            found = [build_dataset(dataset, dataset_id, raw, **({"num_cases": num_cases} if num_cases else {}))]
        elif num_cases and json.loads((found[0] / "dataset.json").read_text())["numTraining"] != num_cases:
            raise CompareError(f"{found[0]} was built with another --num_cases; use another -o")
        return found[0], raw, pre, res
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing:
        raise CompareError(f"-d {dataset} is not a registered builder name, so it is an nnU-Net dataset, and "
                           f"{', '.join(missing)} must be set as for nnU-Net (builders: {', '.join(DATASETS)})")
    raw = Path(os.environ["nnUNet_raw"])
    pattern = f"Dataset{int(dataset):03d}_*" if dataset.isdigit() else dataset
    found = sorted(p for p in raw.glob(pattern) if (p / "dataset.json").is_file())
    if len(found) != 1:
        raise CompareError(f"no single dataset {dataset!r} in {raw} (found {[p.name for p in found]})")
    return found[0], raw, Path(os.environ["nnUNet_preprocessed"]), Path(os.environ["nnUNet_results"])


def _count_parameters(plans: dict, trainer: str, dataset_json: dict) -> int:
    """Parameters of the network the trainer builds from the plans (as nnU-Net's predictor builds it)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import moe_nnunet.trainers as trainers

    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    network = getattr(trainers, trainer).build_network_architecture(
        manager, configuration, determine_num_input_channels(manager, configuration, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=True)
    return sum(p.numel() for p in network.parameters())


def run_compare(dataset: str, output: str | os.PathLike, iterations: int = 800, epoch_iterations: int = 20,
                val_iterations: int = 5, max_features: int = 64, batch_size: int = 12, device: str = "cpu",
                num_cases: int | None = None) -> dict:
    """Plan, train every model of `MODELS` on fold 0 with one budget, evaluate with each modality removed, and
    write comparison.json, comparison.md and curves.png into `output`; returns the report."""
    if iterations < 1 or epoch_iterations < 1 or iterations % epoch_iterations:
        raise ValueError(f"--iterations ({iterations}) must be a positive multiple of --epoch_iterations "
                         f"({epoch_iterations}), e.g. 800 = 40 epochs x 20")
    if val_iterations < 1 or max_features < 8 or batch_size < 1:
        raise ValueError("--val_iterations and --batch_size must be >= 1 and --max_features >= 8")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    folder, raw, pre, res = _folders(dataset, output, num_cases)
    name = folder.name
    dataset_id = name[len("Dataset"):len("Dataset") + 3]
    dataset_json = json.loads((folder / "dataset.json").read_text())
    extra = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res),
               nnUNet_extTrainer=os.pathsep.join(extra + [str(ext_trainer_dir())]))
    env.setdefault("nnUNet_def_n_proc", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
    n_proc = env["nnUNet_def_n_proc"]
    steps = _Steps(output, env)
    schedule = {"num_epochs": iterations // epoch_iterations, "num_iterations_per_epoch": epoch_iterations,
                "num_val_iterations_per_epoch": val_iterations}

    pre_ds = pre / name
    planned = (pre_ds / "nnUNetPlans.json").is_file()
    # a builder's dataset was checked when it was written (geometry, label values)
    verify = [] if dataset in DATASETS else ["--verify_dataset_integrity"]
    steps.run("nnU-Net plan and preprocess (2d)", planned, "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c",
              CONFIGURATION, "-np", n_proc, "-npfp", n_proc, *verify)
    preprocessed = len(list((pre_ds / f"nnUNetPlans_{CONFIGURATION}").glob("*.pkl"))) >= dataset_json["numTraining"]
    steps.run("nnU-Net preprocess (2d)", preprocessed, "nnUNetv2_preprocess", "-d", dataset_id, "-plans_name",
              "nnUNetPlans", "-c", CONFIGURATION, "-np", n_proc)
    steps.run("moe_nnunet plan", (pre_ds / "nnUNetM4oEPlans.json").is_file(), "moe_nnunet", "plan", "-d", dataset_id)
    # every plans file reads nnU-Net's preprocessed 2d data (data identifier nnUNetPlans_2d): nothing to preprocess
    plans = write_compare_plans(pre_ds, res / name, max_features, batch_size, schedule)

    folders = {}
    for model, trainer, plans_name in MODELS:
        fold = res / name / f"{trainer}__{plans_name}__{CONFIGURATION}" / "fold_0"
        folders[model] = fold
        done = (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
        resume = [] if done or not any((fold / f).is_file() for f in ("checkpoint_latest.pth",
                                                                      "checkpoint_final.pth")) else ["--c"]
        step = f"train {model}"
        steps.run(step, done, "nnUNetv2_train", dataset_id, CONFIGURATION, "0", "-tr", trainer, "-p", plans_name,
                  "-device", device, *resume, total=schedule["num_epochs"], progress=_epochs_logged(steps.log(step)))

    robustness = output / "robustness"
    report_file = robustness / "robustness.json"
    finals = [f / "checkpoint_final.pth" for f in folders.values()]
    fresh = report_file.is_file() and all(f.is_file() for f in finals) and \
        report_file.stat().st_mtime > max(f.stat().st_mtime for f in finals) and \
        set(json.loads(report_file.read_text())["results"]) == {t for _, t, _ in MODELS}
    channels = len(dataset_json["channel_names"])
    steps.run("predict held-out cases with each modality removed", fresh, "moe_nnunet", "robustness", "-d",
              dataset_id, "-c", CONFIGURATION, "-tr", *[t for _, t, _ in MODELS], "-p", *[p for _, _, p in MODELS],
              "-f", "0", "-o", str(robustness), "-device", device, "-np", "0" if device == "cpu" else n_proc,
              total=len(MODELS) * (channels + 1),
              progress=lambda: len(list((robustness / "predictions").glob("*/*/summary.json"))))
    return _write_report(output, name, dataset_json, plans, folders, schedule, iterations, max_features, batch_size,
                         device, json.loads(report_file.read_text()), steps.seconds)


def _write_report(output: Path, name: str, dataset_json: dict, plans: dict, folders: dict, schedule: dict,
                  iterations: int, max_features: int, batch_size: int, device: str, robustness: dict,
                  seconds: dict) -> dict:
    import datetime
    import statistics

    previous = output / "comparison.json"
    if previous.is_file():  # the times of steps reused from an earlier run
        seconds = {**json.loads(previous.read_text()).get("step_seconds", {}), **seconds}
    curves, models = {}, {}
    for model, trainer, plans_name in MODELS:
        c = read_curves(folders[model])
        curves[model] = c
        models[model] = {
            "trainer": trainer, "plans": plans_name, "epochs": len(c["mean_fg_dice"]),
            "parameters": _count_parameters(plans[plans_name], trainer, dataset_json),
            "seconds_per_iteration": round(statistics.median(c["epoch_seconds"]) /
                                           schedule["num_iterations_per_epoch"], 4),
            "training_seconds": round(sum(c["epoch_seconds"]), 1),
            "final_pseudo_dice": round(c["mean_fg_dice"][-1], 4),
            "final_ema_pseudo_dice": round(c["ema_fg_dice"][-1], 4),
            "plateau": plateau_verdict(c["mean_fg_dice"])}
    full = {m: robustness["results"][v["trainer"]]["full input"]["mean"] for m, v in models.items()}
    nnunet, one = full[MODELS[0][0]], full[MODELS[3][0]]
    configuration = plans[NNUNET_PLANS]["configurations"][CONFIGURATION]
    report = {"dataset": name, "configuration": CONFIGURATION, "fold": 0, "device": device,
              "description": dataset_json.get("description", ""),
              "schedule": {**schedule, "iterations": iterations}, "batch_size": batch_size,
              "max_features": max_features, "patch_size": configuration["patch_size"],
              "held_out_cases": robustness["held_out_cases"], "plateau_rule": PLATEAU_RULE, "models": models,
              "sanity": {"nnunet": nnunet, "one_expert": one, "difference_points": round(100 * (one - nnunet), 2),
                         "within_1_point": abs(one - nnunet) <= 0.01},
              "robustness": robustness, "curves": curves, "step_seconds": seconds,
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    (output / "comparison.json").write_text(json.dumps(report, indent=1))
    (output / "comparison.md").write_text(comparison_table(report))
    plot_curves(curves, schedule["num_iterations_per_epoch"],
                f"{name}, {CONFIGURATION}: {iterations} iterations per model, batch {batch_size}, widths <= "
                f"{max_features}", output / "curves.png")
    return report
