"""`moe_nnunet merge`: plans for one model made of trained nnU-Net models (frozen experts) and a trainable gate.

SAM-Med3D-MoE's setting (Wang et al., MICCAI 2024): a general model and models fine-tuned from it, each better
at some labels. `merge_models` checks that the models share one preprocessing and that the dataset to train the
gate on has the union of their labels (matched by name), resolves the network each model's trainer really built
(e.g. the `_debug` trainers' quarter width), checks it against the model's checkpoint, and writes plans whose
network is `MergedExpertsNet` (moe_nnunet/networks/merged.py), trained by `nnUNetTrainerMoEMerge`.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moe_nnunet.evaluation.model_folder import parse_model_folder_name
from moe_nnunet.networks.merged import MERGED_NETWORK_CLASS, SELECTIONS, build_expert, map_labels_by_name
from moe_nnunet.trainers.checkpointing import load_checkpoint_file
from moe_nnunet.trainers.merge import EXPERTS_KEY
from moe_nnunet.workflow.plans_files import NOT_PLANS_FILES, plans_target

__all__ = ["MergeError", "TrainedModel", "read_trained_model", "preprocessing_of", "check_same_preprocessing",
           "union_labels", "trained_architecture", "merge_models"]

CHECKPOINT = "checkpoint_final.pth"


class MergeError(ValueError):
    """Models that cannot be merged as asked (says what differs and what to do)."""


@dataclass
class TrainedModel:
    """A trained nnU-Net model folder `TRAINER__PLANS__CONFIGURATION` with its plans.json and dataset.json."""
    folder: Path
    trainer: str
    plans_name: str
    configuration_name: str
    plans: dict
    dataset_json: dict
    configuration: dict = field(init=False)

    def __post_init__(self) -> None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        if self.configuration_name not in self.plans["configurations"]:
            raise MergeError(f"{self.folder}: its plans.json has no configuration {self.configuration_name}.")
        configuration = copy.deepcopy(PlansManager(self.plans).get_configuration(self.configuration_name).configuration)
        configuration.pop("inherits_from", None)
        self.configuration = configuration

    @property
    def name(self) -> str:
        return self.folder.name

    def folds(self, checkpoint: str = CHECKPOINT) -> list[str]:
        return sorted(p.name[len("fold_"):] for p in self.folder.glob("fold_*") if (p / checkpoint).is_file())


def read_trained_model(path: str | os.PathLike, dataset_name: str | None = None) -> TrainedModel:
    """The model folder at `path`, or named `path` in `$nnUNet_results/<dataset_name>`."""
    folder = Path(path)
    if not folder.is_dir() and dataset_name and os.environ.get("nnUNet_results"):
        folder = Path(os.environ["nnUNet_results"]) / dataset_name / str(path)
    if not folder.is_dir():
        raise MergeError(f"model folder {path} does not exist (give the path of a trained model's folder, "
                         f"TRAINER__PLANS__CONFIGURATION, or such a name in $nnUNet_results/{dataset_name}).")
    parts = parse_model_folder_name(folder.resolve().name)
    missing = [f for f in ("plans.json", "dataset.json") if not (folder / f).is_file()]
    if parts is None or missing:
        raise MergeError(f"{folder} is not a trained nnU-Net model folder: it needs the name "
                         f"TRAINER__PLANS__CONFIGURATION and plans.json, dataset.json" +
                         (f" (missing: {', '.join(missing)})." if missing else "."))
    plans, dataset_json = (json.loads((folder / f).read_text(encoding="utf-8")) for f in ("plans.json", "dataset.json"))
    return TrainedModel(folder.resolve(), *parts, plans, dataset_json)


def _channels(dataset_json: dict) -> list[str]:
    names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return [names[k] for k in sorted(names, key=int)]


def preprocessing_of(plans: dict, configuration: dict, dataset_json: dict) -> dict[str, Any]:
    """What must be equal for one preprocessed input (and one export of the prediction) to serve models."""
    schemes = configuration["normalization_schemes"]
    signature = {
        "channels": _channels(dataset_json),
        "patch dimensions": len(configuration["patch_size"]),
        "spacing": configuration["spacing"],
        "transpose_forward": plans["transpose_forward"],
        "normalization_schemes": schemes,
        "use_mask_for_norm": configuration["use_mask_for_norm"],
        "preprocessor_name": configuration["preprocessor_name"],
        "resampling_fn_data": configuration["resampling_fn_data"],
        "resampling_fn_data_kwargs": configuration["resampling_fn_data_kwargs"],
        "resampling_fn_probabilities": configuration["resampling_fn_probabilities"],
        "resampling_fn_probabilities_kwargs": configuration["resampling_fn_probabilities_kwargs"],
    }
    if "CTNormalization" in schemes:  # the CT scheme clips and scales with the dataset's intensity statistics
        signature["foreground_intensity_properties_per_channel"] = plans["foreground_intensity_properties_per_channel"]
    return signature


def check_same_preprocessing(models: Sequence[TrainedModel]) -> dict[str, Any]:
    """The shared preprocessing of `models`; MergeError listing every property that differs, model by model."""
    for m in models:
        if m.configuration.get("previous_stage"):
            raise MergeError(f"{m.name} is a cascade stage (it reads {m.configuration['previous_stage']}'s "
                             f"segmentation); merge models that read the image only.")
    signatures = [preprocessing_of(m.plans, m.configuration, m.dataset_json) for m in models]
    differ = [key for key in signatures[0] if any(s.get(key) != signatures[0][key] for s in signatures[1:])]
    if differ:
        lines = [f"  {key}: " + "; ".join(f"{s.get(key)} in {m.name}" for m, s in zip(models, signatures))
                 for key in differ]
        raise MergeError("the models do not share one preprocessing, so one network input cannot serve them all:\n"
                         + "\n".join(lines) + "\nMerge models trained on the same plans (to fine-tune a model on "
                         "another dataset, copy its plans there with nnUNetv2_move_plans_between_datasets, then "
                         "train with -pretrained_weights).")
    return signatures[0]


def _labels(dataset_json: dict) -> dict[str, int]:
    return {k: v for k, v in dataset_json["labels"].items() if k != "ignore"}


def union_labels(models: Sequence[TrainedModel], dataset_json: dict, where: str) -> dict[str, int]:
    """Dataset labels (name -> value) that are exactly the union of the models' labels, matched by name; else
    MergeError naming the labels missing on either side. `where` names the dataset.json."""
    for m in models + [None]:
        labels = (m.dataset_json if m else dataset_json)["labels"]
        if any(not isinstance(v, int) for v in labels.values()):
            raise MergeError(f"{m.name if m else where} uses region labels; merging supports label maps only.")
    target = _labels(dataset_json)
    foreground = {name for name, value in target.items() if value}
    predicted: dict[str, list[str]] = {}
    for m in models:
        for name, value in _labels(m.dataset_json).items():
            if value:
                predicted.setdefault(name, []).append(m.name)
    problems = [f"  label {name!r} of {', '.join(by)} is not a label of the dataset: add it to the dataset.json "
                f"'labels' and to the label files (the gate learns from the dataset's segmentations)"
                for name, by in predicted.items() if name not in foreground]
    problems += [f"  the dataset's label {name!r} is predicted by no model: the merged model could not learn it; "
                 f"remove it from the dataset or merge a model that predicts it"
                 for name in sorted(foreground - set(predicted))]
    if problems:
        raise MergeError(f"the merged model predicts the union of the models' labels (matched by name), so the "
                         f"dataset it trains on must have exactly those labels ({where}):\n" + "\n".join(problems))
    return target


def _find_trainer_class(name: str):
    import moe_nnunet.trainers
    if hasattr(moe_nnunet.trainers, name):
        return getattr(moe_nnunet.trainers, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except Exception:  # a trainer not installed here: its plans' network is checked against its checkpoint
        return None


def trained_architecture(model: TrainedModel) -> dict[str, Any]:
    """The network the model's trainer built, as plans entries (class name, kwargs, requires-import keys).

    nnU-Net's trainers build their plans' network. moe_nnunet's change it in two known ways, applied here in
    their order: the `_debug` trainers (`_Narrow`) divide the widths by 4; nnUNetTrainerM4oE on plans of
    another network derives M4oE's kwargs from them. Any other change shows when the checkpoint is loaded.
    """
    from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
    from moe_nnunet.trainers.m4oe import nnUNetTrainerM4oE
    from moe_nnunet.trainers.variants import _Narrow

    architecture = copy.deepcopy(model.configuration["architecture"])
    name, kwargs = architecture["network_class_name"], architecture["arch_kwargs"]
    trainer = _find_trainer_class(model.trainer)
    if trainer is not None and issubclass(trainer, _Narrow):
        trainer.narrow_kwargs(kwargs)
    if trainer is not None and issubclass(trainer, nnUNetTrainerM4oE) and name != M4OE_NETWORK_CLASS:
        name = M4OE_NETWORK_CLASS
        kwargs = m4oe_arch_kwargs(model.configuration["patch_size"], kwargs, len(_channels(model.dataset_json)))
    return {"network_class_name": name, "arch_kwargs": kwargs,
            "arch_kwargs_requires_import": list(architecture["_kw_requires_import"])}


def _check_against_checkpoint(spec: dict, model: TrainedModel, checkpoint: Path) -> None:
    weights = load_checkpoint_file(checkpoint, map_location="cpu")["network_weights"]
    try:
        build_expert(spec).load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as e:
        raise MergeError(f"{model.name}: the network its plans describe does not match its checkpoint {checkpoint} "
                         f"({str(e).splitlines()[0][:300]}...). Its trainer {model.trainer} builds another network "
                         f"than its plans say; merge supports nnU-Net's trainers and moe_nnunet's.") from e


def _total_stride(kwargs: dict, dims: int) -> list[int]:
    strides = kwargs.get("strides") or [[1] * dims]
    return [math.prod(int(s[i]) for s in strides) for i in range(dims)]


def _reusable_data(dataset_name: str, configuration: dict, signature: dict) -> bool:
    """True when the dataset's preprocessed folder holds `configuration`'s data identifier, made by plans with
    the same preprocessing."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = Path(nnUNet_preprocessed) / dataset_name
    identifier = configuration["data_identifier"]
    if not (base / identifier).is_dir() or not (base / "dataset.json").is_file():
        return False
    dataset_json = json.loads((base / "dataset.json").read_text(encoding="utf-8"))
    for plans_file in base.glob("*.json"):
        if plans_file.name in NOT_PLANS_FILES:
            continue
        plans = json.loads(plans_file.read_text(encoding="utf-8"))
        for name in plans.get("configurations", {}):
            cfg = PlansManager(plans).get_configuration(name).configuration
            if cfg.get("data_identifier") == identifier and \
                    preprocessing_of(plans, cfg, dataset_json) == signature:
                return True
    return False


def _split_warnings(models: Sequence[TrainedModel], dataset_name: str, expert_folds: Sequence) -> list[str]:
    """Gate validation cases an expert trained on (its own dataset's splits), where both splits files exist."""
    from nnunetv2.paths import nnUNet_preprocessed

    def splits(name: str):
        path = Path(nnUNet_preprocessed) / name / "splits_final.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    gate = splits(dataset_name)
    warnings = []
    for m, fixed in zip(models, expert_folds):
        own = splits(m.plans["dataset_name"])
        if gate is None or own is None:
            continue
        for f, gate_split in enumerate(gate):
            expert_fold = f if fixed is None else fixed
            if expert_fold != "all" and int(expert_fold) >= len(own):
                continue
            train = set(own[int(expert_fold)]["train"]) if expert_fold != "all" else \
                {k for s in own for k in s["train"] + s["val"]}
            seen = sorted(set(gate_split["val"]) & train)
            if seen:
                warnings.append(f"warning: gate fold {f} validates on {len(seen)} case(s) that {m.name} (fold "
                                f"{expert_fold}) trained on, e.g. {seen[0]}: that fold's validation Dice is "
                                f"optimistic.")
    return warnings


@dataclass
class MergeResult:
    plans_file: Path
    commands: list[str]
    notes: list[str]


def _expert_entries(models: Sequence[TrainedModel], folds: Sequence, signature: dict, union: dict[str, int],
                    checkpoint: str) -> tuple[list[dict], list[dict], set[str] | None]:
    """Per model: the merged network's expert entry (checked against a checkpoint), where its weights are
    (`EXPERTS_KEY` entry), and the folds all models with an unfixed fold have trained (None if all fixed)."""
    patch = models[0].configuration["patch_size"]
    experts, sources, common_folds = [], [], None
    for m, fold in zip(models, folds):
        spec = trained_architecture(m)
        stride = _total_stride(spec["arch_kwargs"], len(patch))
        if any(p % s for p, s in zip(patch, stride)):
            raise MergeError(f"the patch size {patch} (of {models[0].name}) is not divisible by {m.name}'s total "
                             f"stride {stride}; put a model whose patch size suits every model first.")
        trained = m.folds(checkpoint)
        if not trained or (fold is not None and str(fold) not in trained):
            raise MergeError(f"{m.name} has no fold {'' if fold is None else fold} with {checkpoint} (trained "
                             f"folds: {' '.join(trained) or 'none'}).")
        spec.update(name=m.name, input_channels=len(signature["channels"]), num_classes=len(_labels(m.dataset_json)),
                    output_labels=map_labels_by_name(_labels(m.dataset_json), union))
        _check_against_checkpoint(spec, m, m.folder / f"fold_{trained[0] if fold is None else fold}" / checkpoint)
        experts.append(spec)
        sources.append({"model_folder": str(m.folder), "fold": fold, "checkpoint": checkpoint,
                        "dataset": m.plans["dataset_name"], "trainer": m.trainer, "plans": m.plans_name,
                        "configuration": m.configuration_name})
        if fold is None:
            common_folds = set(trained) if common_folds is None else common_folds & set(trained)
    if common_folds is not None and not common_folds:
        raise MergeError("the models share no trained fold (" + "; ".join(f"{m.name}: {' '.join(m.folds(checkpoint))}"
                         for m in models) + "): merge with -f FOLD to use one fold of every model (e.g. -f all).")
    return experts, sources, common_folds


def _read_dataset_json(dataset_name: str) -> tuple[dict, Path]:
    """The dataset.json the trainer will read (the preprocessed copy), else the raw one."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    path = Path(nnUNet_preprocessed) / dataset_name / "dataset.json"
    if not path.is_file():
        path = Path(nnUNet_raw) / dataset_name / "dataset.json"
    return json.loads(path.read_text(encoding="utf-8")), path


def merge_models(dataset: str | int, model_folders: Sequence[str | os.PathLike], plans_name: str,
                 folds: Sequence[str] | None = None, selection: str = "soft", top_k: int = 1,
                 threshold: float = 0.5, gate_hidden: int = 16, checkpoint: str = CHECKPOINT,
                 overwrite: bool = False) -> MergeResult:
    """Write `nnUNet_preprocessed/<dataset>/<plans_name>.json` for the merged model of `model_folders`.

    Args:
        dataset: the dataset the gate trains on (id or name); its labels must be the union of the models'.
        model_folders: trained model folders; the first is the general model.
        folds: None (gate fold F uses each model's fold F), one fold for every model, or one per model.
        selection, top_k, threshold, gate_hidden: the gate's settings (see `MergedExpertsNet`).
        checkpoint: which checkpoint of each fold the experts are loaded from.
        overwrite: replace existing plans of that name (nnU-Net's own plans are refused even so:
            `moe_nnunet.workflow.plans_files.plans_target`).
    """
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    dataset_name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    plans_file = plans_target(Path(nnUNet_preprocessed) / dataset_name, plans_name, overwrite, "-o")
    models = [read_trained_model(p, dataset_name) for p in model_folders]
    if len({m.folder for m in models}) != len(models):
        raise MergeError("the same model folder is given twice.")
    folds = list(folds) if folds else [None]
    if len(folds) == 1:
        folds *= len(models)
    if len(folds) != len(models):
        raise MergeError(f"{len(folds)} folds for {len(models)} models: give one fold for all, or one per model.")
    folds = [f if f in (None, "all") else int(f) for f in folds]
    if selection not in SELECTIONS or top_k < 1 or not 0 < threshold <= 1 or gate_hidden < 1:
        raise MergeError(f"selection must be one of {SELECTIONS}, top_k >= 1, 0 < threshold <= 1, gate_hidden >= 1 "
                         f"(got {selection}, {top_k}, {threshold}, {gate_hidden}).")

    signature = check_same_preprocessing(models)
    dataset_json, dataset_json_path = _read_dataset_json(dataset_name)
    if _channels(dataset_json) != signature["channels"]:
        raise MergeError(f"{dataset_name} has the channels {_channels(dataset_json)} ({dataset_json_path}) but the "
                         f"models read {signature['channels']}; the gate must train on images like the models'.")
    union = union_labels(models, dataset_json, str(dataset_json_path))
    experts, sources, common_folds = _expert_entries(models, folds, signature, union, checkpoint)

    general, config_name = models[0], models[0].configuration_name
    configuration = copy.deepcopy(general.configuration)
    configuration["architecture"] = {
        "network_class_name": MERGED_NETWORK_CLASS,
        "arch_kwargs": {"experts": experts, "conv_op": f"torch.nn.modules.conv.Conv{signature['patch dimensions']}d",
                        "gate_hidden": gate_hidden, "selection": selection, "top_k": top_k,
                        "threshold": threshold, "general_expert": 0},
        "_kw_requires_import": ["conv_op"],
    }
    configuration[EXPERTS_KEY] = sources
    commands = []
    if not (Path(nnUNet_preprocessed) / dataset_name / "dataset_fingerprint.json").is_file():
        commands.append(f"nnUNetv2_extract_fingerprint -d {dataset_id}")
    if not _reusable_data(dataset_name, configuration, signature):
        configuration["data_identifier"] = f"{plans_name}_{config_name}"
        commands.append(f"nnUNetv2_preprocess -d {dataset_id} -plans_name {plans_name} -c {config_name}")
    plans = copy.deepcopy(general.plans)
    plans.update(dataset_name=dataset_name, plans_name=plans_name, configurations={config_name: configuration})
    plans_file.parent.mkdir(parents=True, exist_ok=True)
    plans_file.write_text(json.dumps(plans, indent=2), encoding="utf-8")

    model = f"-d {dataset_id} -c {config_name} -tr nnUNetTrainerMoEMerge -p {plans_name}"
    commands += ["export nnUNet_extTrainer=$(moe_nnunet trainer_path)",
                 f"nnUNetv2_train {dataset_id} {config_name} FOLD -tr nnUNetTrainerMoEMerge -p {plans_name} --npz",
                 f"nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER {model}"]
    if common_folds is None:
        notes = ["FOLD: any (0-4, all); every gate fold uses the models' folds "
                 + ", ".join(f"{m.name}: {f}" for m, f in zip(models, folds))]
    else:
        notes = [f"FOLD: a fold every model has trained ({' '.join(sorted(common_folds))}); gate fold F uses each "
                 f"model's fold F"]
    return MergeResult(plans_file, commands, notes + _split_warnings(models, dataset_name, folds))
