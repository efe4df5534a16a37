"""Models trained on one budget, the machinery of `moe_nnunet compare` and `moe_nnunet demo`.

For one dataset in a set of nnU-Net folders (`moe_nnunet.workflow.steps.Steps`): nnU-Net's 2d planning and
preprocessing and `moe_nnunet plan`; narrowed plans written for every model alike (`write_compare_plans`: features
per stage capped, one batch size, the same patch, the iteration budget stored in the plans for the `_compare`
trainers); fold 0 of the chosen models (rows of `MODELS`) trained one after the other by the stock
`nnUNetv2_train`; then each model's validation curve, plateau verdict, parameters and speed (`train_models`). The
held-out cases with each modality removed: `evaluate_missing`.
"""
from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from moe_nnunet.evaluation.curves import plateau_verdict, read_curves
from moe_nnunet.workflow.steps import Steps, count_files, epochs_logged

__all__ = ["CONFIGURATION", "MODELS", "CompareError", "Budget", "Trained", "compare_plans", "write_compare_plans",
           "train_models", "evaluate_missing"]

CONFIGURATION = "2d"
NNUNET_PLANS, M4OE_PLANS = "nnUNetPlans_compare", "nnUNetM4oEPlans_compare"
ONE_EXPERT_PLANS = "nnUNetM4oEPlans_compare1Expert"
# (row name, trainer, plans): the models compared, every one on the same budget, data and patch
MODELS = (("nnU-Net", "nnUNetTrainer_compare", NNUNET_PLANS),
          ("nnU-Net + channel dropout", "nnUNetTrainerChannelDropout_compare", NNUNET_PLANS),
          ("M4oE", "nnUNetTrainerM4oE_compare", M4OE_PLANS),
          ("M4oE, 1 expert, no dropout (sanity)", "nnUNetTrainerM4oE1Expert_compare", ONE_EXPERT_PLANS))


class CompareError(RuntimeError):
    """The data or the output folder does not fit what was asked (another budget, another dataset); the message
    says what to do."""


@dataclass(frozen=True)
class Budget:
    """What every model of a comparison gets alike: `iterations` training iterations in epochs of
    `epoch_iterations` (one point of the validation curve each, from `val_iterations` batches), at batch
    `batch_size`, with the features per stage of every network capped at `max_features`."""
    iterations: int = 800
    epoch_iterations: int = 20
    val_iterations: int = 5
    max_features: int = 64
    batch_size: int = 12

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.epoch_iterations < 1 or self.iterations % self.epoch_iterations:
            raise ValueError(f"--iterations ({self.iterations}) must be a positive multiple of --epoch_iterations "
                             f"({self.epoch_iterations}), e.g. 800 = 40 epochs x 20")
        if self.val_iterations < 1 or self.max_features < 8 or self.batch_size < 1:
            raise ValueError("--val_iterations and --batch_size must be >= 1 and --max_features >= 8")

    @property
    def schedule(self) -> dict:
        """The trainers' schedule, as stored in the plans (`moe_nnunet.trainers.compare.COMPARE_SCHEDULE_KEY`)."""
        return {"num_epochs": self.iterations // self.epoch_iterations,
                "num_iterations_per_epoch": self.epoch_iterations,
                "num_val_iterations_per_epoch": self.val_iterations}


@dataclass
class Trained:
    """What `train_models` returns: the dataset, the plans it wrote, and per model row (in training order) its
    fold_0 folder, its curves (`read_curves`) and `models[row]`: trainer, plans, epochs, parameters, widths,
    seconds per iteration, training seconds, final pseudo-Dice and its EMA, plateau verdict."""
    dataset: str
    dataset_json: dict
    budget: Budget
    patch_size: list[int]
    plans: dict[str, dict]
    folders: dict[str, Path] = field(default_factory=dict)
    curves: dict[str, dict] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)

    def budget_json(self) -> dict:
        """The budget as the reports show it: iterations, epochs, batch, patch, width cap, validation batches."""
        return {"configuration": CONFIGURATION, "iterations": self.budget.iterations,
                "epochs": self.budget.schedule["num_epochs"], "epoch_iterations": self.budget.epoch_iterations,
                "val_iterations": self.budget.val_iterations, "batch_size": self.budget.batch_size,
                "patch_size": self.patch_size, "max_features": self.budget.max_features}


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
                                   f"--val_iterations, --max_features and --batch_size, or another output folder.")
        file.write_text(json.dumps(p, indent=2))
    return plans


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


# --------------------------------------------------------------------------------------------------- steps


def train_models(steps: Steps, dataset_id: int | str, budget: Budget, models: Sequence[str] | None = None,
                 device: str = "cpu", verify: bool = True, prefix: str = "") -> Trained:
    """Plan and preprocess dataset `dataset_id` of `steps`' nnU-Net folders in 2d, run `moe_nnunet plan`, write the
    narrowed plans for `budget` and train fold 0 of the `models` (row names of `MODELS`, default all) one after
    another; finished trainings are reused, a stopped one continues with `--c`. `verify` runs nnU-Net's and
    `moe_nnunet plan`'s dataset checks (a builder's dataset was checked as it was written); `prefix` goes before
    every step name. Returns the models' curves, verdicts, sizes and speeds."""
    rows = {m: (t, p) for m, t, p in MODELS}
    models = list(rows) if models is None else list(models)
    unknown = [m for m in models if m not in rows]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose among {list(rows)}")
    dataset_id = str(int(dataset_id))
    name = steps.dataset_name(dataset_id)
    if name is None:
        raise CompareError(f"no dataset {dataset_id} in {steps.raw}")
    dataset_json = json.loads((steps.raw / name / "dataset.json").read_text())
    pre = steps.pre / name
    steps.run(f"{prefix}nnU-Net plan and preprocess (2d)", (pre / "nnUNetPlans.json").is_file(),
              "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", CONFIGURATION, "-np", steps.n_proc,
              "-npfp", steps.n_proc, *(["--verify_dataset_integrity"] if verify else []))
    preprocessed = len(list((pre / f"nnUNetPlans_{CONFIGURATION}").glob("*.pkl"))) >= dataset_json["numTraining"]
    steps.run(f"{prefix}nnU-Net preprocess (2d)", preprocessed, "nnUNetv2_preprocess", "-d", dataset_id,
              "-plans_name", "nnUNetPlans", "-c", CONFIGURATION, "-np", steps.n_proc)
    steps.run(f"{prefix}moe_nnunet plan", (pre / "nnUNetM4oEPlans.json").is_file(), "moe_nnunet", "plan", "-d",
              dataset_id, "-np", steps.n_proc, *([] if verify else ["--no_verify"]))
    # every plans file reads nnU-Net's preprocessed 2d data (data identifier nnUNetPlans_2d): nothing to preprocess
    plans = write_compare_plans(pre, steps.res / name, budget.max_features, budget.batch_size, budget.schedule)
    trained = Trained(name, dataset_json, budget,
                      list(plans[NNUNET_PLANS]["configurations"][CONFIGURATION]["patch_size"]), plans)
    for model in models:
        trainer, plans_name = rows[model]
        fold = steps.res / name / f"{trainer}__{plans_name}__{CONFIGURATION}" / "fold_0"
        trained.folders[model] = fold
        done = (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
        resume = [] if done or not any((fold / f).is_file() for f in ("checkpoint_latest.pth",
                                                                      "checkpoint_final.pth")) else ["--c"]
        step = f"{prefix}train {model}"
        steps.run(step, done, "nnUNetv2_train", dataset_id, CONFIGURATION, "0", "-tr", trainer, "-p", plans_name,
                  "-device", device, *resume, total=budget.schedule["num_epochs"],
                  progress=epochs_logged(steps.log(step)), unit="epoch")
    for model in models:
        trainer, plans_name = rows[model]
        c = read_curves(trained.folders[model])
        if c is None:
            raise CompareError(f"{trained.folders[model]} holds no checkpoint: its training did not finish")
        arch = plans[plans_name]["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
        trained.curves[model] = c
        trained.models[model] = {
            "trainer": trainer, "plans": plans_name, "epochs": len(c["mean_fg_dice"]),
            "parameters": _count_parameters(plans[plans_name], trainer, dataset_json),
            "features_per_stage": list(arch["features_per_stage"]),
            **({"expert_features_per_stage": list(arch["expert_features_per_stage"])}
               if "expert_features_per_stage" in arch else {}),
            "seconds_per_iteration": round(statistics.median(c["epoch_seconds"]) / budget.epoch_iterations, 4),
            "training_seconds": round(sum(c["epoch_seconds"]), 1),
            "final_pseudo_dice": round(c["mean_fg_dice"][-1], 4),
            "final_ema_pseudo_dice": round(c["ema_fg_dice"][-1], 4),
            "plateau": plateau_verdict(c["mean_fg_dice"])}
    return trained


def evaluate_missing(steps: Steps, trained: Trained, output: Path, device: str = "cpu", prefix: str = "") -> dict:
    """`moe_nnunet robustness` on fold 0's held-out cases for every trained model: the full input, then each
    modality removed. Redone only when a model is newer than `output`/robustness.json. Returns that report."""
    dataset_id = trained.dataset[len("Dataset"):len("Dataset") + 3]
    models = [(trained.models[m]["trainer"], trained.models[m]["plans"]) for m in trained.models]
    report_file = output / "robustness.json"
    finals = [f / "checkpoint_final.pth" for f in trained.folders.values()]
    fresh = report_file.is_file() and all(f.is_file() for f in finals) and \
        report_file.stat().st_mtime > max(f.stat().st_mtime for f in finals) and \
        set(json.loads(report_file.read_text())["results"]) == {t for t, _ in models}
    steps.run(f"{prefix}predict held-out cases with each modality removed", fresh, "moe_nnunet", "robustness", "-d",
              dataset_id, "-c", CONFIGURATION, "-tr", *[t for t, _ in models], "-p", *[p for _, p in models],
              "-f", "0", "-o", str(output), "-device", device, "-np", "0" if device == "cpu" else steps.n_proc,
              total=len(models) * (len(trained.dataset_json["channel_names"]) + 1),
              progress=count_files(output / "predictions", "*/*/summary.json"), unit="prediction")
    return json.loads(report_file.read_text())
