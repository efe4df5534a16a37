"""The networks to measure, from a preprocessed dataset's plans or from a patch size alone.

- `plans_setup(dataset, configuration, ...)`: a preprocessed dataset's plans (ours, default
  nnUNetM4oEPlans) against nnU-Net's plans for the same configuration (default nnUNetPlans);
- `synthetic_setup(channels, patch_size, ...)`: no dataset; both networks use nnU-Net's default
  topology for the patch (the GPU reference runs use this);
- `add_references` adds reference networks (`moe_nnunet.profiling.references`), `override_ours` a variant of ours.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from typing import Any, Sequence

from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
from moe_nnunet.profiling.references import REFERENCES, RESENC_UNET, SWIN_UNETR, resenc_m_kwargs, swinunetr_unavailable
from moe_nnunet.profiling.spec import BenchmarkSetup, NetworkSpec

__all__ = ["default_conv_unet_kwargs", "synthetic_setup", "plans_setup", "add_references", "override_ours",
           "first_line"]

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
# kwargs of nnU-Net's PlainConvUNet; M4oE plans carry them too, so a baseline can be built from them
CONV_UNET_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                  "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                  "dropout_op_kwargs", "nonlin", "nonlin_kwargs")


def default_conv_unet_kwargs(patch_size: Sequence[int]) -> dict:
    """PlainConvUNet kwargs with nnU-Net's default topology for a patch (isotropic spacing).

    Stages, strides and kernels come from nnU-Net's `get_pool_and_conv_props` (bottleneck at least 4
    voxels per axis); widths are 32 * 2**s capped at 320 (3D) or 512 (2D); two convs per stage.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    dim = len(patch_size)
    if dim not in (2, 3):
        raise ValueError(f"patch_size {list(patch_size)} has {dim} axes; give 2 (2D) or 3 (3D) sizes.")
    _, strides, kernels, padded, _ = get_pool_and_conv_props([1.0] * dim, list(patch_size), 4, 999999)
    padded = [int(i) for i in padded]
    if padded != [int(i) for i in patch_size]:
        raise ValueError(f"patch_size {list(patch_size)} is not divisible by nnU-Net's downsampling for it; "
                         f"use {padded} instead.")
    n = len(strides)
    cap = 320 if dim == 3 else 512
    return {
        "n_stages": n,
        "features_per_stage": [min(32 * 2 ** s, cap) for s in range(n)],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": [[int(k) for k in ks] for ks in kernels],
        "strides": [[int(s) for s in st] for st in strides],
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def synthetic_setup(channels: int = 4, patch_size: Sequence[int] = (128, 128, 128), batch_size: int = 2,
                    num_classes: int = 3) -> BenchmarkSetup:
    """Both networks for a patch without any dataset: nnU-Net's PlainConvUNet with its default topology,
    and our network derived from the same kwargs by `m4oe_arch_kwargs` (one expert per channel)."""
    if channels < 1 or batch_size < 1 or num_classes < 1:
        raise ValueError(f"channels={channels}, batch_size={batch_size} and num_classes={num_classes} must all "
                         f"be at least 1.")
    patch = [int(i) for i in patch_size]
    conv_kwargs = default_conv_unet_kwargs(patch)
    ours = NetworkSpec("ours", M4OE_NETWORK_CLASS, m4oe_arch_kwargs(patch, conv_kwargs, channels),
                       list(REQUIRES_IMPORT), channels, num_classes,
                       "m4oe_arch_kwargs over nnU-Net's default topology for the patch")
    baseline = NetworkSpec("baseline", PLAIN_CONV_UNET, conv_kwargs, list(REQUIRES_IMPORT), channels, num_classes,
                           "nnU-Net's PlainConvUNet, default topology for the patch")
    return BenchmarkSetup(ours, baseline, patch, batch_size, True, {"source": "synthetic"})


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def plans_setup(dataset: str | int, configuration: str, plans: str = "nnUNetM4oEPlans",
                baseline_plans: str = "nnUNetPlans", patch_size: Sequence[int] | None = None,
                batch_size: int | None = None, channels: int | None = None) -> BenchmarkSetup:
    """Both networks from a preprocessed dataset's plans.

    Ours: the configuration's architecture in `<nnUNet_preprocessed>/<dataset>/<plans>.json`, converted with
    `m4oe_arch_kwargs` when those plans name another network. Baseline: the same configuration of
    `<baseline_plans>.json` if that file has it, otherwise nnU-Net's PlainConvUNet with our plans' stages.
    Patch and batch size default to our plans'; channels to dataset.json's; outputs follow the labels.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ValueError("nnUNet_preprocessed is not set; export it (see nnU-Net's documentation/"
                         "setting_up_paths.md), or benchmark without a dataset: moe_nnunet bench --synthetic")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"dataset {dataset}: not found ({first_line(e)})") from e
    folder = os.path.join(root, name)
    plans_file = os.path.join(folder, f"{plans}.json")
    dataset_file = os.path.join(folder, "dataset.json")
    if not os.path.isfile(plans_file):
        existing = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
        raise ValueError(f"plans file {plans_file} not found (dataset {name}); create it with "
                         f"`moe_nnunet plan -d {dataset}` or pick one with -p (found: {existing or 'none'}).")
    if not os.path.isfile(dataset_file):
        raise ValueError(f"{dataset_file} not found; run nnUNetv2_preprocess for {name} first.")
    with open(dataset_file) as f:
        dataset_json = json.load(f)

    manager = PlansManager(plans_file)
    if configuration not in manager.available_configurations:
        raise ValueError(f"configuration {configuration!r} is not in {plans_file}; "
                         f"choose one of {manager.available_configurations}.")
    config = manager.get_configuration(configuration)
    patch = [int(i) for i in (patch_size or config.patch_size)]
    names = [str(n) for n in (dataset_json.get("channel_names") or dataset_json.get("modality") or {}).values()]
    channels = int(channels or len(names))
    num_classes = manager.get_label_manager(dataset_json).num_segmentation_heads

    kwargs = copy.deepcopy(config.network_arch_init_kwargs)
    requires_import = list(config.network_arch_init_kwargs_req_import)
    if config.network_arch_class_name != M4OE_NETWORK_CLASS:
        origin = (f"{plans}.json {configuration} ({config.network_arch_class_name.rsplit('.', 1)[-1]}) "
                  f"converted by m4oe_arch_kwargs")
        kwargs = m4oe_arch_kwargs(patch, kwargs, channels, names if len(names) == channels else None)
        requires_import = [k for k in requires_import if k in kwargs]
    else:
        origin = f"{plans}.json {configuration}"
        if channels != len(kwargs.get("expert_channels", [])):  # --channels override: one expert per channel
            kwargs["expert_channels"] = [[c] for c in range(channels)]
            kwargs.pop("expert_names", None)
    ours = NetworkSpec("ours", M4OE_NETWORK_CLASS, kwargs, requires_import, channels, num_classes, origin)

    info = {"source": "plans", "dataset": name, "configuration": configuration, "plans": plans_file,
            "planned_patch_size": [int(i) for i in config.patch_size], "planned_batch_size": config.batch_size}
    baseline_file = os.path.join(folder, f"{baseline_plans}.json")
    baseline_manager = PlansManager(baseline_file) if os.path.isfile(baseline_file) else None
    if baseline_manager is not None and configuration in baseline_manager.available_configurations:
        base = baseline_manager.get_configuration(configuration)
        baseline = NetworkSpec("baseline", base.network_arch_class_name,
                               copy.deepcopy(base.network_arch_init_kwargs),
                               list(base.network_arch_init_kwargs_req_import), channels, num_classes,
                               f"{baseline_plans}.json {configuration}")
        info.update(baseline_plans=baseline_file, baseline_planned_patch_size=[int(i) for i in base.patch_size],
                    baseline_planned_batch_size=base.batch_size)
    else:
        why = "not found" if baseline_manager is None else f"has no {configuration}"
        baseline = NetworkSpec("baseline", PLAIN_CONV_UNET, {k: kwargs[k] for k in CONV_UNET_KEYS if k in kwargs},
                               [k for k in requires_import if k in CONV_UNET_KEYS], channels, num_classes,
                               f"PlainConvUNet with the stages of {plans}.json ({baseline_plans}.json {why})")
    return BenchmarkSetup(ours, baseline, patch, int(batch_size or config.batch_size), bool(config.batch_dice), info)


def override_ours(setup: BenchmarkSetup, changes: dict[str, Any]) -> BenchmarkSetup:
    """Measure a variant of our network: `changes` replace entries of its architecture kwargs (the
    `arch_kwargs` of the plans), e.g. {"n_conv_per_stage": [1, 2, 2, 2, 2, 2]}. Only existing keys."""
    unknown = sorted(set(changes) - set(setup.ours.arch_kwargs))
    if unknown:
        raise ValueError(f"--ours_arch: {', '.join(unknown)} not among our network's arguments; it takes "
                         f"{', '.join(sorted(setup.ours.arch_kwargs))}.")
    setup.ours = replace(setup.ours, arch_kwargs={**setup.ours.arch_kwargs, **changes},
                         origin=f"{setup.ours.origin}, with {json.dumps(changes)}")
    return setup


def add_references(setup: BenchmarkSetup, names: Sequence[str]) -> BenchmarkSetup:
    """Add reference networks by name (`REFERENCES`) to `setup`, built for its patch, channels and outputs.

    ResEnc M takes the baseline's stages, kernels and strides when the baseline is a PlainConvUNet, otherwise
    those of our network. SwinUNETR (feature size 48) is skipped, with the reason in `setup.skipped`, when
    MONAI is not installed or the patch does not suit it."""
    unknown = [n for n in names if n not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown reference network(s) {unknown}; choose from {list(REFERENCES)}.")
    base = setup.baseline if setup.baseline.class_name == PLAIN_CONV_UNET else setup.ours
    conv_kwargs = {k: base.arch_kwargs[k] for k in CONV_UNET_KEYS if k in base.arch_kwargs}
    channels, classes = setup.ours.input_channels, setup.ours.num_classes
    for name in dict.fromkeys(names):
        if name == "resenc_m":
            setup.references.append(NetworkSpec(name, RESENC_UNET, resenc_m_kwargs(conv_kwargs), list(REQUIRES_IMPORT),
                                                channels, classes, "nnU-Net's ResidualEncoderUNet, ResEnc M blocks "
                                                f"over the stages of the {base.name} network"))
        elif (why := swinunetr_unavailable(setup.patch_size)) is not None:
            setup.skipped[name] = why
        else:
            setup.references.append(NetworkSpec(name, SWIN_UNETR, {"feature_size": 48,
                                                                   "spatial_dims": len(setup.patch_size)},
                                                [], channels, classes, "MONAI's SwinUNETR, feature size 48"))
    return setup
