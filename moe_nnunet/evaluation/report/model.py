"""A trained nnU-Net model folder as the report reads it: its folds' validation summaries, training logs and
gate statistics."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Fold", "Model", "load_model"]

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


@dataclass
class Fold:
    name: str                 # "0", "1", ... or "all"
    path: Path
    summary: dict             # validation/summary.json
    logging: dict             # nnU-Net's logger dict from the checkpoint ({} without one)
    gate_cases: dict          # gate_weights_validation.json "cases" ({} for trainers without a gate)
    gate_experts: list        # its "experts"


@dataclass
class Model:
    path: Path
    dataset: str
    trainer: str
    plans: str
    configuration: str
    dataset_json: dict
    folds: list[Fold]
    notes: list[str] = field(default_factory=list)
    title: str = ""           # column title in the report

    @property
    def fold_names(self) -> str:
        return ", ".join(f.name for f in self.folds)

    @property
    def labels(self) -> dict[str, str]:
        """nnU-Net's summary key (str(value) or str(region tuple)) -> label name, background excluded."""
        keys = {}
        for name, value in self.dataset_json["labels"].items():
            key = str(value) if isinstance(value, int) else str(tuple(value))
            if key != "0":
                keys[key] = name
        return keys

    @property
    def value_names(self) -> dict[int, str]:
        """Integer value in exported segmentations -> label name."""
        order = self.dataset_json.get("regions_class_order")
        if order:  # region-based training exports label maps with these values
            return dict(zip(order, self.labels.values()))
        return {int(k): n for k, n in self.labels.items()}


def _load_logging(fold_dir: Path) -> dict:
    from moe_nnunet.trainers.checkpointing import load_checkpoint_file
    for name in CHECKPOINTS:
        if (fold_dir / name).is_file():
            ckpt = load_checkpoint_file(fold_dir / name, map_location="cpu", mmap=True)
            return ckpt.get("logging", {}) or {}
    return {}


def load_model(folder: str | os.PathLike) -> Model:
    """Read a trained model folder; raises FileNotFoundError / ValueError with what to do about it."""
    from moe_nnunet.evaluation.model_folder import parse_model_folder_name

    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a trained model folder such as "
                                f"$nnUNet_results/Dataset001_Name/nnUNetTrainer__nnUNetPlans__3d_fullres")
    parts = parse_model_folder_name(path.name)
    if parts is None:
        raise ValueError(f"{path.name} is not named <Trainer>__<Plans>__<configuration> like nnU-Net's model folders; "
                         f"give the folder inside $nnUNet_results/DatasetXXX_Name/")
    fold_dirs = sorted((p for p in path.glob("fold_*") if p.is_dir()),
                       key=lambda p: (not p.name[5:].isdigit(), int(p.name[5:]) if p.name[5:].isdigit() else 0))
    if not fold_dirs:
        raise FileNotFoundError(f"{path} holds no fold_N folders: train first (nnUNetv2_train {path.parent.name} "
                                f"{parts[2]} 0 -tr {parts[0]} -p {parts[1]})")
    if not (path / "dataset.json").is_file():
        raise FileNotFoundError(f"{path} has no dataset.json; nnUNetv2_train writes it when training starts")
    folds, notes = [], []
    for d in fold_dirs:
        summary_file = d / "validation" / "summary.json"
        if not summary_file.is_file():
            notes.append(f"{d.name} left out: no validation/summary.json yet (finish training, or run "
                         f"nnUNetv2_train {path.parent.name} {parts[2]} {d.name[5:]} -tr {parts[0]} -p {parts[1]} --val)")
            continue
        gate_file = d / "gate_weights_validation.json"
        gate = json.loads(gate_file.read_text()) if gate_file.is_file() else {"cases": {}, "experts": []}
        folds.append(Fold(d.name[5:], d, json.loads(summary_file.read_text()), _load_logging(d), gate["cases"],
                          gate["experts"]))
    if not folds:
        found = ", ".join(d.name for d in fold_dirs)
        raise FileNotFoundError(f"no fold of {path} ({found}) has validation/summary.json, nnU-Net's evaluation of "
                                f"the held-out cases: let training finish, or validate a trained fold with "
                                f"nnUNetv2_train {path.parent.name} {parts[2]} {fold_dirs[0].name[5:]} -tr {parts[0]} "
                                f"-p {parts[1]} --val")
    return Model(path, path.parent.name, parts[0], parts[1], parts[2],
                 json.loads((path / "dataset.json").read_text()), folds, notes)
