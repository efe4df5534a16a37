"""Peak memory of a training step, counted with fake tensors: no GPU, no memory, no arithmetic.

`simulate_training_memory` runs one nnU-Net training step of a network (forward with deep supervision,
nnU-Net's loss, backward, gradient clipping, optimizer step; the same step `moe_nnunet bench` times) under
torch's `FakeTensorMode`, where every tensor has a shape, a dtype and a device but no data. A dispatch mode
counts the bytes of every tensor storage from the moment an operator creates it until Python frees it,
and keeps the largest total. That is the quantity `torch.cuda.max_memory_allocated` reports on a GPU, less
what the CUDA libraries allocate for themselves (cuDNN workspaces) and the allocator's rounding.

The step runs on the CPU backend, so two things are made to behave as on a GPU:

- **Attention.** On CUDA, `scaled_dot_product_attention` with a learned bias runs a fused
  (memory-efficient) kernel that keeps q, k, v, the bias, the output and one log-sum-exp per query for
  backward, and materialises the bias gradient at its broadcast shape during backward. The CPU backend
  has no fused kernel for a bias that needs a gradient and would keep the whole attention matrix. Here
  the call is replaced by an autograd function that keeps and allocates what the fused kernel does.
- **Autocast.** CUDA's autocast runs layer norm, group norm, softmax and cross-entropy in float32;
  CPU's leaves them in bfloat16. Their inputs are promoted to float32 here, as CUDA would.

It takes seconds for nnU-Net-sized networks at 128³, which is what makes it usable as a planner's memory
check and as a benchmark row on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe_nnunet.profiling.runner import Runner

__all__ = ["MemoryEstimate", "LiveTensorBytes", "simulate_training_memory", "fake_network", "format_parts",
           "NNUNET_REFERENCE", "planner_units_to_gib", "training_memory_in_planner_units"]

GIB = 2 ** 30
# nnU-Net's ExperimentPlanner: a network whose `compute_conv_feature_map_size` is `value` trains at
# `batch_size` in `gb` GB of GPU memory (UNet_reference_val_{2d,3d}, UNet_reference_val_corresp_bs_{2d,3d},
# UNet_reference_val_corresp_GB)
NNUNET_REFERENCE = {2: {"value": 85_000_000, "batch_size": 12, "gb": 8},
                    3: {"value": 560_000_000, "batch_size": 2, "gb": 8}}


def training_memory_in_planner_units(spec, patch_size, ref_value: float | None = None,
                                     ref_batch_size: int | None = None, ref_gb: float | None = None) -> float:
    """Our planner's estimate: the simulated peak of a 16-bit AdamW training step at nnU-Net's reference
    batch size, in nnU-Net's units (a plan fits when it is at most the reference value scaled to the
    GPU-memory target). It is a step of the expert curriculum, whose expert heads make it the larger of
    the two phases. The reference defaults are nnU-Net's (`NNUNET_REFERENCE`)."""
    ref = NNUNET_REFERENCE[len(patch_size)]
    ref_value = ref["value"] if ref_value is None else ref_value
    ref_batch_size = ref["batch_size"] if ref_batch_size is None else ref_batch_size
    ref_gb = ref["gb"] if ref_gb is None else ref_gb
    peak = simulate_training_memory(spec, patch_size, ref_batch_size, bf16=True, optimizer="adamw",
                                    curriculum=True).peak_bytes
    return peak / (ref_gb * GIB) * ref_value


def planner_units_to_gib(units: float, ndim: int, batch_size: int) -> float:
    """The GPU memory nnU-Net's planner budgets for an estimate of `units` (its feature-map count) at
    `batch_size`, in GiB (nnU-Net's GB read as GiB): it assumes memory in proportion to both."""
    ref = NNUNET_REFERENCE[ndim]
    return units / ref["value"] * ref["gb"] * batch_size / ref["batch_size"]


@dataclass
class MemoryEstimate:
    """Result of `simulate_training_memory`.

    peak_bytes: most bytes alive at once during the step (parameters, gradients, optimizer state, input,
        targets and activations).
    static_bytes: bytes alive before the step (parameters, buffers, optimizer state, input, targets).
    by_part: at the peak, bytes per producer: "forward: <module>" for tensors made inside a module's
        forward (module names cut to `depth` parts), "backward", "optimizer", or "held" (parameters,
        buffers, input and targets).
    """
    peak_bytes: int
    static_bytes: int
    by_part: dict[str, int] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive, and their largest total.

    Every storage an operator returns is counted once, from its creation until it is garbage-collected
    (a weak reference's callback). Views share their base's storage and add nothing. Tensors made before
    the mode are counted once `hold` is called with them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.label = "held"
        self._storages: dict[int, tuple[weakref.ref, int, str]] = {}
        self._parts: Counter = Counter()  # live bytes per label
        self._peak_parts: Counter | None = None

    def hold(self, tensors) -> None:
        for t in tensors:
            self._count(t)

    def parts_at_peak(self) -> dict[str, int]:
        return dict(self._peak_parts or {})

    def _count(self, t: torch.Tensor) -> bool:
        storage = t.untyped_storage()
        key = id(storage)
        known = self._storages.get(key)
        if known is not None and known[0]() is storage:
            return False
        nbytes, label = storage.nbytes(), self.label

        def freed(_, key=key, nbytes=nbytes, label=label) -> None:
            self.live -= nbytes
            self._parts[label] -= nbytes
            self._storages.pop(key, None)

        self._storages[key] = (weakref.ref(storage, freed), nbytes, label)
        self.live += nbytes
        self._parts[label] += nbytes
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        if self.live > self.peak:
            self.peak = self.live
            self._peak_parts = +self._parts  # a copy, without labels at zero
        return out


class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in for CUDA's memory-efficient attention: output and log-sum-exp made, q, k, v, bias, output
    and log-sum-exp kept for backward; backward makes the q/k/v gradients and the bias gradient at the
    broadcast shape. Values are never computed (only used on fake tensors)."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, bias if bias is not None else q.new_empty(0), out, lse)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, _, _ = ctx.saved_tensors
        grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None]
        if ctx.has_bias and ctx.needs_input_grad[3]:
            full = torch.empty(torch.broadcast_shapes(bias.shape, (*q.shape[:-1], k.shape[-2])), dtype=bias.dtype,
                               device=bias.device)
            grads[3] = full.sum_to_size(bias.shape)
        return tuple(grads)


_CUDA_FLOAT32_OPS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy, torch.softmax,
                     torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax}


class _AsOnCuda(TorchFunctionMode):
    """Fused attention and CUDA's float32 autocast ops, on the CPU backend (see the module docstring)."""

    def __init__(self, bf16: bool) -> None:
        super().__init__()
        self.bf16 = bf16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None and mask.dtype == torch.bool:
                mask = None  # a boolean mask is not kept for a gradient; its bytes are the caller's
            if torch.is_autocast_enabled("cpu") and self.bf16:
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            return _FusedAttentionMemory.apply(q, k, v, mask)
        if self.bf16 and func in _CUDA_FLOAT32_OPS and args and isinstance(args[0], torch.Tensor) \
                and args[0].dtype == torch.bfloat16:
            args = (args[0].float(),) + tuple(args[1:])
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _module_labels(net: nn.Module, counter: LiveTensorBytes, depth: int) -> Iterator[None]:
    """Label tensors made in a module's forward with the module's name (cut to `depth` parts)."""
    names = {id(m): ".".join(n.split(".")[:depth]) or "network" for n, m in net.named_modules()}
    stack: list[str] = []

    def enter(module, _args):
        name = names.get(id(module))
        if name is not None:
            stack.append(counter.label)
            counter.label = f"forward: {name}"

    def leave(module, _args, _out):
        if id(module) in names and stack:
            counter.label = stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fake_copy(net: nn.Module, mode) -> nn.Module:
    """`net` with every parameter and buffer replaced by a fake tensor of the same shape (in place)."""
    for module in net.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    return net


def fake_network(spec, mode) -> nn.Module:
    """`spec`'s network (deep supervision on) with fake parameters and buffers of `mode` (a FakeTensorMode)."""
    try:
        with mode:
            return spec.build(deep_supervision=True, allow_init=False)  # values do not matter
    except Exception:  # a constructor that reads tensor values (e.g. `.item()`): build it for real, then fake it
        return _fake_copy(spec.build(deep_supervision=True, allow_init=False), mode)


def simulate_training_memory(spec, patch_size, batch_size: int, bf16: bool = True, batch_dice: bool = False,
                             optimizer: str = "sgd", depth: int = 3, curriculum: bool = False) -> MemoryEstimate:
    """Peak memory of nnU-Net training steps of one network, on fake tensors (see the module docstring).

    Args:
        spec: a `moe_nnunet.profiling.spec.NetworkSpec` (class, kwargs, channels, outputs).
        patch_size: spatial input size.
        batch_size: samples per step.
        bf16: bfloat16 autocast, as `moe_nnunet bench --bf16` (nnU-Net's float16 autocast keeps the same bytes).
        batch_dice: nnU-Net's batch Dice (does not change the memory noticeably).
        optimizer: "sgd" (nnU-Net's, as the benchmark) or "adamw" (our trainers': one more buffer per parameter).
        depth: module-name parts kept in `by_part`.
        curriculum: a step of the expert curriculum (our network's expert heads and their losses live).
    Returns:
        `MemoryEstimate` of a training step after the first (the optimizer's state exists).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r}: use 'sgd' or 'adamw'.")
    counter = LiveTensorBytes()
    mode = FakeTensorMode()
    net = fake_network(spec, mode)
    with mode:
        runner = Runner(spec, list(patch_size), batch_size, batch_dice, torch.device("cpu"), bf16, net=net,
                        curriculum=curriculum)
        if optimizer == "adamw":
            runner.optimizer = torch.optim.AdamW(runner.net.parameters(), lr=1e-4, weight_decay=1e-2,
                                                 foreach=True)
        else:  # for-each kernels, as torch picks them on CUDA (their temporaries count)
            runner.optimizer = torch.optim.SGD(runner.net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99,
                                               nesterov=True, foreach=True)
        runner._set_mode(True)
        # the optimizer's state exists from the first step on; made here as the first step makes it
        for p in runner.net.parameters():
            if optimizer == "adamw":
                runner.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                             "exp_avg_sq": torch.zeros_like(p)}
            else:
                runner.optimizer.state[p] = {"momentum_buffer": torch.zeros_like(p)}
        counter.hold([*runner.net.parameters(), *runner.net.buffers(), runner.x, *runner.targets,
                      *[t for state in runner.optimizer.state.values() for t in state.values()
                        if isinstance(t, torch.Tensor)]])
        static = counter.live
        with counter, _AsOnCuda(bf16), _module_labels(runner.net, counter, depth):
            counter.label = "forward: outside modules (loss)"
            loss = runner._loss()
            counter.label = "backward"
            loss.backward()
            del loss
            counter.label = "optimizer"
            torch.nn.utils.clip_grad_norm_(runner.net.parameters(), 12, foreach=True)
            runner.optimizer.step()
            runner.optimizer.zero_grad(set_to_none=True)
    return MemoryEstimate(peak_bytes=int(counter.peak), static_bytes=int(static),
                          by_part=dict(sorted(counter.parts_at_peak().items(), key=lambda kv: -kv[1])))


def format_parts(estimate: MemoryEstimate, top: int = 12) -> str:
    """The largest producers at the peak, one line each, in GiB."""
    lines = [f"peak {estimate.peak_gib:.2f} GiB (held before the step: {estimate.static_bytes / GIB:.2f} GiB)"]
    for name, nbytes in list(estimate.by_part.items())[:top]:
        lines.append(f"  {nbytes / GIB:7.3f} GiB  {name}")
    return "\n".join(lines)

