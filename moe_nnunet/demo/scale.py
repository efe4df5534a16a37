"""What the demo runs: its settings (`SETTINGS`) and, per mode, how large and how long (`SCALES`).

`SCALES` is the one place that sets the demo's size: per mode and setting the dataset builder's arguments and the
`Budget` that every model of the setting gets alike (iterations, iterations per epoch, validation batches per
epoch, the cap on the features per stage, the batch size). Change the numbers here; a demo folder run with other
numbers is refused (`--fresh` starts over).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from moe_nnunet.evaluation.equal_budget import Budget

__all__ = ["Setting", "SettingScale", "SETTINGS", "SCALES", "NOTES", "LUNG_ID", "BRAIN_ID", "scale_json"]


@dataclass(frozen=True)
class Setting:
    key: str
    title: str
    data: str                      # what the data is: real, derived or synthetic
    dataset_id: int
    models: tuple[str, ...]        # row names of moe_nnunet.evaluation.equal_budget.MODELS
    missing_modality: bool         # evaluate with each modality removed


SETTINGS = (
    Setting("ct_mri", "CT + MRI experts across datasets (M4oE's setting)",
            "REAL-derived: crops around the lung tumours of 2 CT scans and the lesions of 2 brain MRI scans "
            "(pyradiomics 3.0.1 test data), combined into one dataset with a modality tag per case",
            910, ("nnU-Net", "M4oE"), False),
    Setting("phantom", "Missing modality (BraTS-like 4-channel phantom)",
            "SYNTHETIC: BraTS-like phantom with T1, T1c, T2 and FLAIR; edema, non-enhancing core and enhancing rim "
            "each need several channels (T1c alone shows the rim), look-alike decoys, per-case gain, bias field "
            "and noise",
            908, ("nnU-Net", "nnU-Net + channel dropout", "M4oE"), True),
)
LUNG_ID, BRAIN_ID = 903, 904


@dataclass(frozen=True)
class SettingScale:
    """One setting in one mode: the builder's keyword arguments (`phantom`: `build_brats_phantom`; `ct_mri`:
    `build_lung_ct` and `build_brain_mri`, each `num_cases` crops) and the budget of every model."""
    data: dict
    budget: Budget


# CPU: thin 48 x 48 slabs and 32 x 32 crops, so that nnU-Net's 2d patch is 48 x 48 and 32 x 32, networks at most
# 32 features wide, batch 12; 20 epochs per model, enough for the plateau rule's quarters (5 epochs each)
_CPU = {"phantom": SettingScale({"num_cases": 24, "shape": (4, 48, 48), "spacing": (4.0, 2.5, 2.5)},
                                Budget(iterations=600, epoch_iterations=30, val_iterations=4, max_features=32,
                                       batch_size=12)),
        "ct_mri": SettingScale({"num_cases": 10, "spacing_zyx": (5.0, 2.0, 2.0), "crop_size_zyx": (16, 32, 32)},
                               Budget(iterations=600, epoch_iterations=30, val_iterations=4, max_features=32,
                                      batch_size=12))}
SCALES: dict[str, dict[str, SettingScale]] = {
    "cpu": _CPU,
    # the CPU data with 2 epochs of 2 iterations: a check that every step runs
    "quick": {k: replace(s, budget=replace(s.budget, iterations=4, epoch_iterations=2, val_iterations=1))
              for k, s in _CPU.items()},
    # the builders' own sizes (80 x 80 slabs, 96 x 96 crops), nnU-Net's widths up to 64
    "cuda": {"phantom": SettingScale({"num_cases": 40}, Budget(iterations=2000, epoch_iterations=50,
                                                               val_iterations=10, max_features=64, batch_size=12)),
             "ct_mri": SettingScale({"num_cases": 10}, Budget(iterations=2000, epoch_iterations=50,
                                                              val_iterations=10, max_features=64, batch_size=12))},
}

NOTES = {
    "quick": "--quick: {iterations} iterations per model, a check that the pipeline runs; the numbers mean nothing.",
    "cpu": "CPU scale: small 2d patches and narrow networks for every model alike, each model trained until its "
           "validation pseudo-Dice levels off (see each setting's curves and plateau verdicts). A model reported "
           "'still rising' has not converged and its Dice is not its accuracy. With few held-out cases the Dice "
           "varies by a few points between runs.",
    "cuda": "GPU scale: the builders' own image sizes and wider networks, every model on the same budget; see each "
            "setting's curves and plateau verdicts.",
}


def scale_json(mode: str) -> dict:
    """A mode's scale as JSON (what demo_mode.json records, so that runs at other numbers are not mixed)."""
    return {k: {"data": s.data, "budget": asdict(s.budget)} for k, s in SCALES[mode].items()}
