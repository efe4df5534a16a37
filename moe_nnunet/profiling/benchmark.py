"""Measure our M4oE network against nnU-Net's own network on the same input, in one process.

Both networks are built from plans kwargs through nnU-Net's `get_network_from_plans`, get the same input,
the same nnU-Net loss (deep-supervision Dice + cross-entropy) and nnU-Net's SGD, and are timed in
alternation (ours, baseline, ours, baseline, ...) so that a noisy machine slows both alike. Reference
networks (`moe_nnunet.profiling.references`: nnU-Net's ResEnc M, MONAI's SwinUNETR) join the alternation when
asked for with `add_references`.

Two ways to describe what to measure:

- `plans_setup(dataset, configuration, ...)`: a preprocessed dataset's plans (ours, default
  nnUNetM4oEPlans) against nnU-Net's plans for the same configuration (default nnUNetPlans);
- `synthetic_setup(channels, patch_size, ...)`: no dataset; both networks use nnU-Net's default
  topology for the patch (the GPU reference runs use this).

`run_benchmark(setup, ...)` returns a JSON-serialisable dict; `format_report(result)` renders it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from moe_nnunet.training import MoETrainingLoss
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

from moe_nnunet.profiling.references import (REFERENCES, RESENC_UNET, SWIN_UNETR, resenc_m_kwargs,
                                         swinunetr_unavailable)
from moe_nnunet.profiling.memory import (GIB, NNUNET_REFERENCE, planner_units_to_gib, simulate_training_memory,
                               training_memory_in_planner_units)
from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs

__all__ = ["NetworkSpec", "BenchmarkSetup", "default_conv_unet_kwargs", "synthetic_setup", "plans_setup",
           "add_references", "override_ours", "run_benchmark", "format_report", "write_json"]

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
# kwargs of nnU-Net's PlainConvUNet; M4oE plans carry them too, so a baseline can be built from them
CONV_UNET_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                  "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                  "dropout_op_kwargs", "nonlin", "nonlin_kwargs")
MIB = 2 ** 20


@dataclass
class NetworkSpec:
    """Everything `get_network_from_plans` needs to build one network, plus where it came from.

    Args:
        name: "ours", "baseline" or a reference's name (`REFERENCES`).
        class_name: dotted network class.
        arch_kwargs: JSON-serialisable constructor kwargs (as in plans).
        kw_requires_import: keys of `arch_kwargs` whose values are dotted class names.
        input_channels, num_classes: network input and output channels.
        origin: human-readable source of the architecture, for the report.
    """
    name: str
    class_name: str
    arch_kwargs: dict
    kw_requires_import: list[str]
    input_channels: int
    num_classes: int
    origin: str

    def build(self, deep_supervision: bool = True, allow_init: bool = True) -> nn.Module:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        return get_network_from_plans(self.class_name, self.arch_kwargs, self.kw_requires_import,
                                      self.input_channels, self.num_classes, allow_init=allow_init,
                                      deep_supervision=deep_supervision)


@dataclass
class BenchmarkSetup:
    """The networks and the input they are measured on (batch_size x channels x patch_size).

    `references` are measured like the baseline; `skipped` names the references left out, with the reason."""
    ours: NetworkSpec
    baseline: NetworkSpec
    patch_size: list[int]
    batch_size: int
    batch_dice: bool = True
    info: dict = field(default_factory=dict)
    references: list[NetworkSpec] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def networks(self) -> list[NetworkSpec]:
        return [self.ours, self.baseline, *self.references]


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


def _first_line(error: Exception) -> str:
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
        raise ValueError(f"dataset {dataset}: not found ({_first_line(e)})") from e
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


def _check_patch(spec: NetworkSpec, patch: Sequence[int]) -> None:
    strides = spec.arch_kwargs.get("strides")
    if strides is None:  # a reference without nnU-Net's stages checks its patch itself (add_references)
        return
    if len(strides[0]) != len(patch):
        raise ValueError(f"the {spec.name} network is {len(strides[0])}D but patch_size {list(patch)} has "
                         f"{len(patch)} axes.")
    divisor = [math.prod(s[a] for s in strides) for a in range(len(patch))]
    if any(p % d for p, d in zip(patch, divisor)):
        raise ValueError(f"patch_size {list(patch)} is not divisible by {divisor}, the total downsampling of the "
                         f"{spec.name} network ({spec.origin}); choose a patch_size that is.")


def _deep_supervision_shapes(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Output sizes of the deep-supervision heads, highest resolution first (nnU-Net's scales)."""
    shapes, size = [], list(patch)
    for stride in strides[:-1]:
        size = [i // s for i, s in zip(size, stride)]
        shapes.append(size)
    return shapes


def _nnunet_loss(num_outputs: int, batch_dice: bool) -> nn.Module:
    """nnU-Net's default training loss: Dice + CE per output, weights 1/2**i, lowest resolution off."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2 ** i for i in range(num_outputs)])
    if num_outputs > 1:
        weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def _attention_flops(backward: bool) -> Callable[..., int]:
    def count(*shapes: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(*shapes[:4]) if backward else sdpa_flop_count(*shapes[:3])
    return count


def _conv_backward_flops(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any, _padding: Any,
                         _dilation: Any, transposed: bool, _output_padding: Any, _groups: Any, output_mask: Any,
                         out_shape: Any = None, **kwargs: Any) -> int:
    """A convolution's backward: the input gradient and the weight gradient each cost one forward. (torch's own
    formula counts the weight gradient of a grouped convolution as if it were ungrouped, `groups` times too
    much, which would make grouped experts look several times costlier than they are.)"""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU one that SDPA picks with a mask, and
# miscounts grouped convolutions' backward
_FLOP_FORMULAS = {
    op: _attention_flops(backward) for op, backward in (
        (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), False),
        (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), True))
    if op is not None}
_FLOP_FORMULAS[torch.ops.aten.convolution_backward] = _conv_backward_flops




def _flop_counter() -> FlopCounterMode:
    # module paths up to six names long, root included: down to encoder.experts.stages.<s>.<block>
    return FlopCounterMode(depth=6, display=False, custom_mapping=_FLOP_FORMULAS)


def _module_names(counts: dict[str, dict[Any, int]]) -> dict[str, int]:
    """FlopCounterMode's per-module totals, keyed by module path below the root (up to 5 names), with expert
    indices collapsed to `*` (summed over experts). UNetDecoder keeps its encoder as `decoder.encoder`;
    that alias is read as `encoder`."""
    unique: dict[str, int] = {}
    for key, per_op in counts.items():
        parts = key.split(".")[1:]
        if key == "Global" or not parts or len(parts) > 5:
            continue
        if parts[:2] == ["decoder", "encoder"]:
            parts = parts[1:]
        name = ".".join(parts)
        unique[name] = max(unique.get(name, 0), int(sum(per_op.values())))
    merged: dict[str, int] = defaultdict(int)
    for name, flops in unique.items():
        parts = name.split(".")
        parts = ["*" if p.isdigit() and i and parts[i - 1] == "experts" else p for i, p in enumerate(parts)]
        merged[".".join(parts)] += flops
    return dict(merged)


def _params_by_part(net: nn.Module) -> dict[str, int]:
    """Parameter count per module path of depth <= 2; shared modules are counted once, where first named."""
    parts: dict[str, int] = defaultdict(int)
    for name, p in net.named_parameters():
        path = name.split(".")[:-1]
        for depth in (1, 2):
            if len(path) >= depth:
                parts[".".join(path[:depth])] += p.numel()
    return dict(parts)


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Runner:
    """One network with its input, random targets, nnU-Net loss and optimizer; times one step at a time."""

    def __init__(self, spec: NetworkSpec, patch: Sequence[int], batch_size: int, batch_dice: bool,
                 device: torch.device, bf16: bool, net: nn.Module | None = None, curriculum: bool = False) -> None:
        self.spec, self.device, self.bf16 = spec, device, bf16
        if net is None:
            with device:  # parameters are made where they will live
                net = spec.build(deep_supervision=True)
        if any(t.device != device for t in [*net.parameters(), *net.buffers()]):
            net = net.to(device)
        self.net = net
        self.model: nn.Module = self.net  # what gets called: the network, or its compiled wrapper
        self.x = torch.randn(batch_size, spec.input_channels, *patch, device=device)
        # one target per deep-supervision output; a network without nnU-Net's stages has one output
        strides = spec.arch_kwargs.get("strides")
        shapes = _deep_supervision_shapes(patch, strides) if strides else [list(patch)]
        self.targets = [torch.randint(0, spec.num_classes, (batch_size, 1, *shape), device=device)
                        for shape in shapes]
        # nnU-Net's loss; for our network (a dict in training) also the router losses and, during the expert
        # curriculum (`curriculum`), each expert's own loss through its head, as our trainers compute them
        ds_loss = _nnunet_loss(len(self.targets), batch_dice)
        self.loss = MoETrainingLoss(ds_loss, ds_loss.loss)
        if curriculum and hasattr(self.net, "expert_heads_active"):
            self.net.expert_heads_active = True
            self.loss.mixture_weight = 0.5
        # nnU-Net's optimizer (nnUNetTrainer.configure_optimizers)
        self.optimizer = torch.optim.SGD(self.net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99,
                                         nesterov=True)
        self.times: dict[str, list[float]] = {"train": [], "inference": [], "sliding_window": []}
        self.peak_extra: dict[str, int] = {"train": 0, "inference": 0, "sliding_window": 0}
        self._start_allocated = 0

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _set_mode(self, train: bool) -> None:
        self.net.train(train)
        if hasattr(getattr(self.net, "decoder", None), "deep_supervision"):
            self.net.decoder.deep_supervision = train

    def _loss(self) -> torch.Tensor:
        """Forward, nnU-Net's deep-supervision loss, plus the network's auxiliary (router) loss if it has one."""
        with self._autocast():
            output = self.model(self.x)
            return self.loss(output if isinstance(output, (list, tuple, dict)) else [output], self.targets)

    def _begin(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_allocated = torch.cuda.memory_allocated(self.device)
        return time.perf_counter()

    def _end(self, start: float, phase: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - start) * 1e3
        if self.device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(self.device) - self._start_allocated
            self.peak_extra[phase] = max(self.peak_extra[phase], extra)
        return ms

    def train_step(self) -> float:
        """One nnU-Net training step (forward, DS loss + auxiliary loss, backward, clip, SGD step); ms."""
        self._set_mode(True)
        self.optimizer.zero_grad(set_to_none=True)
        start = self._begin()
        self._loss().backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
        self.optimizer.step()
        return self._end(start, "train")

    def inference(self) -> float:
        """One forward pass as nnU-Net predicts (eval, inference mode, deep supervision off); ms."""
        self._set_mode(False)
        start = self._begin()
        with torch.inference_mode(), self._autocast():
            self.model(self.x)
        return self._end(start, "inference")

    def sliding_window(self, case: torch.Tensor, mirroring: bool) -> float:
        """nnU-Net's sliding-window prediction of one whole case (C, *size), as `nnUNetv2_predict` runs it:
        `nnUNetPredictor` with its defaults (tiles overlapping by half, Gaussian weighting, float16 autocast
        on CUDA, results kept on the device) and test-time mirroring over all axes if `mirroring`; ms."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

        self._set_mode(False)
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notes on CPU devices and default labels
            predictor = nnUNetPredictor(use_mirroring=mirroring, device=self.device, allow_tqdm=False,
                                        perform_everything_on_device=self.device.type == "cuda")
        configuration = ConfigurationManager({"patch_size": list(self.x.shape[2:]), "architecture": {
            "network_class_name": self.spec.class_name, "arch_kwargs": self.spec.arch_kwargs,
            "_kw_requires_import": self.spec.kw_requires_import}})
        labels = {"background": 0, **{f"class_{i}": i for i in range(1, self.spec.num_classes)}}
        with contextlib.redirect_stdout(io.StringIO()):
            predictor.manual_initialization(self.model, PlansManager({"configurations": {}}), configuration, None,
                                            {"labels": labels}, "bench", tuple(range(case.ndim - 1)))
        start = self._begin()
        predictor.predict_sliding_window_return_logits(case)
        return self._end(start, "sliding_window")

    def count_flops(self) -> dict[str, Any]:
        """FLOPs (2 per multiply-add; convolutions, matmuls, attention) of one training step and one forward."""
        self._set_mode(True)
        with _flop_counter() as train_counter:
            self._loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        self._set_mode(False)
        with torch.inference_mode(), self._autocast(), _flop_counter() as counter:
            self.model(self.x)
        return {"train_flops": train_counter.get_total_flops(),
                "inference_flops": counter.get_total_flops(),
                "inference_flops_by_module": _module_names(counter.get_flop_counts())}

    def static_bytes(self, train: bool) -> int:
        """Bytes held between steps: parameters, buffers, input and targets, and (training) SGD momentum."""
        total = _tensor_bytes(self.net.parameters()) + _tensor_bytes(self.net.buffers())
        total += _tensor_bytes([self.x, *self.targets])
        if train:
            total += sum(_tensor_bytes(s.values()) for s in self.optimizer.state.values())
        return total

    def describe(self, patch: Sequence[int]) -> dict[str, Any]:
        """Class, origin, kwargs, parameter counts and the planner's estimate for `patch`."""
        try:
            estimate = int(self.net.compute_conv_feature_map_size(list(patch)))
        except (AttributeError, NotImplementedError):
            estimate = None
        return {"class": self.spec.class_name, "origin": self.spec.origin, "arch_kwargs": self.spec.arch_kwargs,
                "params": sum(p.numel() for p in self.net.parameters()),
                "trainable_params": sum(p.numel() for p in self.net.parameters() if p.requires_grad),
                "params_by_part": _params_by_part(self.net), "planner_estimate": estimate}


def _peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, which a new program starts from zero; getrusage's ru_maxrss would carry over the peak of
    the process that started it. Elsewhere: ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


# imported before a probe reads its starting peak, so that import memory does not count as the network's
_PROBE_IMPORTS = ("nnunetv2.utilities.get_network_from_plans", "nnunetv2.training.loss.compound_losses",
                  "nnunetv2.training.loss.deep_supervision", "nnunetv2.training.loss.dice")


def _cpu_memory_probe(spec: NetworkSpec, patch: list[int], batch_size: int, batch_dice: bool, bf16: bool,
                      threads: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth (MiB) over building the network and one forward
    ("inference"), then over one training step as well ("train")."""
    import importlib
    for module in _PROBE_IMPORTS + (spec.class_name.rsplit(".", 1)[0],):
        importlib.import_module(module)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    before = _peak_rss_bytes()
    runner = _Runner(spec, patch, batch_size, batch_dice, torch.device("cpu"), bf16)
    runner.inference()
    after_inference = _peak_rss_bytes()
    runner.train_step()
    after_train = _peak_rss_bytes()
    return {"inference": (after_inference - before) / MIB, "train": (after_train - before) / MIB}


def _cpu_memory(setup: BenchmarkSetup, bf16: bool) -> dict[str, dict[str, float]]:
    """Peak CPU memory of each network, each in a freshly started process of its own (a peak cannot be
    taken back, so in one process the larger network would hide the smaller). "spawn" starts a new
    program, whose peak starts from zero; a forked process would inherit its parent's."""
    specs = setup.networks
    args = [(spec, setup.patch_size, setup.batch_size, setup.batch_dice, bf16, torch.get_num_threads())
            for spec in specs]
    with multiprocessing.get_context("spawn").Pool(len(specs), maxtasksperchild=1) as pool:
        return {spec.name: mem for spec, mem in zip(specs, pool.starmap(_cpu_memory_probe, args))}


def _simulated_memory(spec: NetworkSpec, setup: BenchmarkSetup, bf16: bool) -> dict[str, Any]:
    """`simulate_training_memory` of the benchmark's step (nnU-Net's SGD), or why it could not be made."""
    try:
        estimate = simulate_training_memory(spec, setup.patch_size, setup.batch_size, bf16=bf16,
                                            batch_dice=setup.batch_dice, optimizer="sgd", depth=2)
    except Exception as error:  # noqa: BLE001 - reported, the other figures still stand
        return {"simulated_train_memory_error": f"{type(error).__name__}: {_first_line(error)}"}
    return {"simulated_train_memory_mib": estimate.peak_bytes / MIB,
            "simulated_train_memory_by_part_mib": {k: v / MIB for k, v in estimate.by_part.items()}}


def _ours_planner_estimate(spec: NetworkSpec, patch: Sequence[int], fallback: float) -> float:
    """What `M4oEPlanner` hands nnU-Net for this network and patch (its fallback if the simulation fails)."""
    try:
        return training_memory_in_planner_units(spec, list(patch))
    except Exception:  # noqa: BLE001 - as the planner: fall back to the feature-map count
        return fallback


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_benchmark(setup: BenchmarkSetup, device: str = "cpu", iterations: int = 10, warmup: int = 3,
                  bf16: bool = False, compile: bool = False, measure_memory: bool = True,
                  command: str | None = None, progress: Callable[[str], None] | None = None,
                  peak_tflops: float | None = None, simulate: bool = False,
                  case_size: Sequence[int] | None = None, case_repeats: int = 3,
                  mirroring: bool = True) -> dict[str, Any]:
    """Time, count and size the networks of `setup`; returns a JSON-serialisable dict.

    Args:
        setup: the two networks and their input.
        device: "cpu" or "cuda" (or "cuda:<i>").
        iterations: measured steps per network and phase (medians are reported).
        warmup: unmeasured steps before them (cuDNN autotuning, compilation, allocator warm-up).
        bf16: bfloat16 autocast for forward and loss.
        compile: `torch.compile` both networks (CUDA only, as in nnU-Net).
        measure_memory: on CPU, run one extra process per network to read its peak RSS.
        command: the command line, stored in the result.
        progress: called with a short message before each phase.
        peak_tflops: the device's peak TFLOP/s for the precision used; with it, model FLOP utilisation
            (training-step FLOPs / median step time / peak) is reported.
        simulate: nothing is timed or allocated: parameters, FLOPs, the simulated training memory and the
            planner's estimate, all on fake tensors (`moe_nnunet.profiling.memory`), in seconds even at 128³ on a
            CPU. `device`, `iterations`, `warmup`, `compile`, `measure_memory` and `peak_tflops` are unused.
        case_size: also time nnU-Net's sliding-window prediction of a whole case of this size (random
            values, the networks' channels) with each network, `case_repeats` times after one warm-up
            (when `warmup` > 0), with test-time `mirroring` as nnU-Net's default.
    """
    if simulate:
        if compile:
            raise ValueError("--compile measures compiled kernels on a GPU; --simulate times nothing: give one.")
        return _simulated_benchmark(setup, bf16, command, progress)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu or cuda.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA GPU; use --device cpu.")
    if compile and dev.type != "cuda":
        raise ValueError("--compile needs --device cuda (nnU-Net does not compile on CPU either).")
    if iterations < 1 or warmup < 0:
        raise ValueError(f"iterations={iterations} must be >= 1 and warmup={warmup} >= 0.")
    if case_size is not None and (len(case_size) != len(setup.patch_size) or min(case_size) < 1
                                  or case_repeats < 1):
        raise ValueError(f"case_size {list(case_size)} needs {len(setup.patch_size)} positive sizes, like the "
                         f"patch {setup.patch_size}, and case_repeats={case_repeats} must be >= 1.")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak_tflops={peak_tflops} must be positive (e.g. the bf16 dense peak of the GPU).")
    for spec in setup.networks:
        _check_patch(spec, setup.patch_size)
    began = time.perf_counter()

    def say(message: str) -> None:
        if progress is not None:
            progress(f"{time.perf_counter() - began:7.1f} s  {message}")

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's training entry point does

    say("building networks")
    runners = [_Runner(spec, setup.patch_size, setup.batch_size, setup.batch_dice, dev, bf16)
               for spec in setup.networks]
    networks = {r.spec.name: r.describe(setup.patch_size) for r in runners}
    say("counting FLOPs: one extra training step and forward per network")
    for r in runners:
        networks[r.spec.name].update(r.count_flops())
    say("simulating each network's training-step memory on fake tensors")
    _add_simulated_memory(networks, setup, bf16)

    memory_method = "torch.cuda.max_memory_allocated during the step + parameters, buffers, optimizer state, " \
                    "input and targets"
    if dev.type == "cpu":
        memory_method = "approximate: growth of the peak resident set size of a fresh process over building " \
                        "the network and one forward / then also one training step"
        if measure_memory:
            say("measuring CPU memory: a fresh process per network, both at once")
            for name, mem in _cpu_memory(setup, bf16).items():
                networks[name].update(train_memory_mib=mem["train"], inference_memory_mib=mem["inference"])

    if compile:
        for r in runners:
            r.model = torch.compile(r.net)
    for phase, step in (("train", _Runner.train_step), ("inference", _Runner.inference)):
        say(f"timing {phase}: {warmup} warm-up + {iterations} measured steps per network, alternating")
        for i in range(warmup + iterations):
            for r in runners:
                ms = step(r)
                if i >= warmup:
                    r.times[phase].append(ms)

    if case_size is not None:
        case = torch.randn(setup.ours.input_channels, *case_size)  # on the host, as nnU-Net's preprocessed data
        say(f"timing nnU-Net's sliding-window prediction of a {'x'.join(map(str, case_size))} case"
            f"{' with mirroring' if mirroring else ''}: {int(warmup > 0)} warm-up + {case_repeats} per network")
        for i in range(int(warmup > 0) + case_repeats):
            for r in runners:
                ms = r.sliding_window(case, mirroring)
                if i >= int(warmup > 0):
                    r.times["sliding_window"].append(ms)

    for r in runners:
        record = networks[r.spec.name]
        for phase in ("train", "inference", "sliding_window"):
            if not r.times[phase]:
                continue
            record[f"{phase}_ms"] = statistics.median(r.times[phase])
            record[f"{phase}_ms_all"] = [round(t, 3) for t in r.times[phase]]
            if phase == "sliding_window":
                if dev.type == "cuda":
                    record["sliding_window_memory_mib"] = (r.peak_extra[phase] + r.static_bytes(False)) / MIB
                continue
            if dev.type == "cuda":
                record[f"{phase}_memory_mib"] = (r.peak_extra[phase] + r.static_bytes(phase == "train")) / MIB
            if peak_tflops is not None:  # FLOP/s achieved over the median step, as a share of the peak
                achieved = record[f"{phase}_flops"] / (record[f"{phase}_ms"] * 1e-3)
                record[f"{phase}_mfu"] = achieved / (peak_tflops * 1e12)
        if dev.type == "cuda":  # how far the simulation and the planner are from the measured peak
            for key in ("simulated_train_memory_mib", "planner_memory_mib"):
                record[f"{key}_over_measured"] = _ratio(record.get(key), record.get("train_memory_mib"))
    return _result(setup, networks, command, memory_method,
                   {"type": dev.type, "name": _device_name(dev), "load_average_before": load_before,
                    "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
                   {"iterations": iterations, "warmup": warmup, "bf16": bf16, "compile": compile,
                    "peak_tflops": peak_tflops, "simulate": False,
                    "case_size": None if case_size is None else list(case_size),
                    "case_repeats": case_repeats if case_size is not None else None, "mirroring": mirroring})


def _add_simulated_memory(networks: dict[str, dict[str, Any]], setup: BenchmarkSetup, bf16: bool) -> None:
    """Each network's simulated training-step memory; ours gets the planner's estimate our planner makes,
    and every network the GPU memory nnU-Net's planner budgets for its estimate."""
    ndim = len(setup.patch_size)
    for spec in setup.networks:
        record = networks[spec.name]
        record.update(_simulated_memory(spec, setup, bf16))
        if spec.name == "ours" and record.get("planner_estimate") is not None:
            record["planner_estimate"] = _ours_planner_estimate(spec, setup.patch_size, record["planner_estimate"])
        if record.get("planner_estimate") is not None and ndim in NNUNET_REFERENCE:
            record["planner_memory_mib"] = planner_units_to_gib(record["planner_estimate"], ndim,
                                                                setup.batch_size) * GIB / MIB


def _simulated_benchmark(setup: BenchmarkSetup, bf16: bool, command: str | None,
                         progress: Callable[[str], None] | None) -> dict[str, Any]:
    """`run_benchmark(..., simulate=True)`: parameters, FLOPs and memory of every network on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_nnunet.profiling.memory import fake_network

    for spec in setup.networks:
        _check_patch(spec, setup.patch_size)
    began = time.perf_counter()
    networks = {}
    for spec in setup.networks:
        if progress is not None:
            progress(f"{time.perf_counter() - began:7.1f} s  {spec.name}: parameters and FLOPs on fake tensors")
        mode = FakeTensorMode()
        net = fake_network(spec, mode)
        with mode:
            runner = _Runner(spec, setup.patch_size, setup.batch_size, setup.batch_dice, torch.device("cpu"),
                             bf16, net=net)
            networks[spec.name] = {**runner.describe(setup.patch_size), **runner.count_flops()}
    if progress is not None:
        progress(f"{time.perf_counter() - began:7.1f} s  simulating each network's training-step memory")
    _add_simulated_memory(networks, setup, bf16)
    return _result(setup, networks, command, "not measured: --simulate (see the simulated rows)",
                   {"type": "none", "name": "none (fake tensors)", "load_average_before": None,
                    "load_average_after": None},
                   {"iterations": 0, "warmup": 0, "bf16": bf16, "compile": False, "peak_tflops": None,
                    "simulate": True})


def _result(setup: BenchmarkSetup, networks: dict[str, dict[str, Any]], command: str | None, memory_method: str,
            device: dict[str, Any], how: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable result: the figures per network, ours / each other network, and the context."""
    ours = networks["ours"]
    keys = ("train_ms", "inference_ms", "sliding_window_ms", "sliding_window_memory_mib", "train_memory_mib",
            "inference_memory_mib", "simulated_train_memory_mib", "params", "train_flops", "inference_flops",
            "planner_estimate", "planner_memory_mib")
    # ours / each other network; "ratios" keeps ours / baseline
    ratios_to = {name: {key: _ratio(ours.get(key), other.get(key)) for key in keys if key in ours}
                 for name, other in networks.items() if name != "ours"}
    return {
        "command": command,
        "argv": list(sys.argv),
        "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "nnunetv2": _package_version("nnunetv2"),
                     "dynamic_network_architectures": _package_version("dynamic_network_architectures"),
                     "moe_nnunet": _package_version("moe_nnunet")},
        "setup": {**setup.info, "patch_size": setup.patch_size, "batch_size": setup.batch_size,
                  "channels": setup.ours.input_channels, "num_classes": setup.ours.num_classes,
                  "batch_dice": setup.batch_dice, **how},
        "memory_method": memory_method,
        "networks": networks,
        "skipped": dict(setup.skipped),
        "ratios": ratios_to["baseline"],
        "ratios_to": ratios_to,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """Readable table of a `run_benchmark` result: a column per network, then ours / each other network, and
    where our FLOPs go."""
    s, networks = result["setup"], result["networks"]
    ratios_to = result.get("ratios_to") or {"baseline": result["ratios"]}
    precision = ("bf16 autocast" if s["bf16"] else "fp32") + (", torch.compile" if s["compile"] else ", eager")
    if s.get("simulate"):
        precision = ("bf16 autocast" if s["bf16"] else "fp32") + "; simulated on fake tensors, nothing timed"
    rows = [
        ("training step, median ms", "train_ms", 1, 1),
        ("inference forward, median ms", "inference_ms", 1, 1),
        ("sliding window, whole case, median ms", "sliding_window_ms", 1, 1),
        ("  its peak memory, MiB", "sliding_window_memory_mib", 1, 0),
        ("training peak memory, MiB", "train_memory_mib", 1, 0),
        ("  simulated (fake tensors), MiB", "simulated_train_memory_mib", 1, 0),
        ("  planner's estimate, MiB", "planner_memory_mib", 1, 0),
        ("inference peak memory, MiB", "inference_memory_mib", 1, 0),
        ("parameters, M", "params", 1e-6, 2),
        ("training step, GFLOP", "train_flops", 1e-9, 1),
        ("inference forward, GFLOP", "inference_flops", 1e-9, 1),
        ("planner estimate, M nnU-Net units", "planner_estimate", 1e-6, 1),
    ]
    if s.get("peak_tflops"):
        rows += [("training model FLOP utilisation, %", "train_mfu", 100, 1),
                 ("inference model FLOP utilisation, %", "inference_mfu", 100, 1)]
    names = list(networks)
    columns = names + [f"ours/{n}" for n in ratios_to]
    width = max(12, *(len(c) + 2 for c in columns))
    lines = [f"device: {result['device']['name']}; torch {result['versions']['torch']}, "
             f"nnunetv2 {result['versions']['nnunetv2']}; {precision}"
             + (f"; peak {s['peak_tflops']:g} TFLOP/s" if s.get("peak_tflops") else ""),
             f"input: batch {s['batch_size']} x {s['channels']} channels x {'x'.join(map(str, s['patch_size']))}, "
             f"{s['num_classes']} outputs"
             + ("" if s.get("simulate") else
                f"; {s['iterations']} measured steps after {s['warmup']} warm-up, alternating")]
    if s.get("case_size"):
        lines.append(f"sliding window: one {'x'.join(map(str, s['case_size']))} case, nnUNetPredictor's defaults "
                     f"(half-tile overlap, Gaussian weights, float16 autocast on CUDA), mirroring "
                     f"{'on' if s['mirroring'] else 'off'}, {s['case_repeats']} measured per network")
    lines += [f"{n} ({networks[n]['class'].rsplit('.', 1)[-1]}): {networks[n]['origin']}" for n in names]
    lines += [f"{n}: skipped ({why})" for n, why in result.get("skipped", {}).items()]
    lines += ["", f"{'':36}" + "".join(f"{c:>{width}}" for c in columns)]
    for label, key, scale, digits in rows:
        values = [networks[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = [_fmt(None if v is None else v * scale, digits) for v in values]
        cells += [_fmt(ratios_to[n][key], 2) if key in ratios_to[n] else "" for n in ratios_to]
        lines.append(f"{label:36}" + "".join(f"{c:>{width}}" for c in cells))
    lines += ["", f"memory: {result['memory_method']}", ""]
    return "\n".join(lines + _our_parts(networks["ours"]))


def _our_parts(ours: dict[str, Any]) -> list[str]:
    """Where our network's forward FLOPs and parameters sit: experts (per stage), gates, decoder."""
    flops, params = ours.get("inference_flops_by_module", {}), ours.get("params_by_part", {})
    depths = ours["arch_kwargs"].get("swin_depths", [])
    rows = [("experts, all", flops.get("encoder.experts"), params.get("encoder.experts"))]
    for s, depth in enumerate(depths):
        kind = f"Swin, {depth} blocks" if depth else "conv"
        rows.append((f"  stage {s} ({kind})", flops.get(f"encoder.experts.stages.{s}"), None))
    gates = [v for k, v in flops.items() if k.startswith("encoder.gates.") and k.count(".") == 2]
    rows += [("gates", sum(gates) if gates else None, params.get("encoder.gates")),
             ("expert heads (curriculum only)", None, params.get("encoder.heads")),
             ("decoder", flops.get("decoder"), params.get("decoder"))]
    lines = [f"{'ours, by part':36}{'inference GFLOP':>22}{'parameters, M':>30}"]
    for label, f, p in rows:
        if f is not None or p is not None:
            lines.append(f"{label:36}{_fmt(None if f is None else f * 1e-9):>22}"
                         f"{_fmt(None if p is None else p * 1e-6, 2):>30}")
    return lines


def write_json(result: dict[str, Any], path: str) -> None:
    """Write a `run_benchmark` result as indented JSON (creating the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
