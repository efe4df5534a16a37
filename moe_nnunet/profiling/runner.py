"""One network set up for nnU-Net's training step on random data (`Runner`): the piece that the benchmark
times and counts and that the memory simulation runs on fake tensors."""
from __future__ import annotations

import contextlib
import io
import time
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from moe_nnunet.profiling.flops import flop_counter, flops_by_module
from moe_nnunet.profiling.spec import NetworkSpec
from moe_nnunet.training import MoETrainingLoss

__all__ = ["Runner"]


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


class Runner:
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
        with flop_counter() as train_counter:
            self._loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        self._set_mode(False)
        with torch.inference_mode(), self._autocast(), flop_counter() as counter:
            self.model(self.x)
        return {"train_flops": train_counter.get_total_flops(),
                "inference_flops": counter.get_total_flops(),
                "inference_flops_by_module": flops_by_module(counter.get_flop_counts())}

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
