"""Narrowing expert-axis modules to a subset of their experts, for inference without absent experts.

Every expert-axis module of the network has a `select_experts(indices) -> nn.Module` method that returns the
same module for the experts `indices` only (in that order): a shell of the same class whose expert-axis
tensors are those experts' slices, and which shares every other parameter, buffer and child with the
original (no copy). The helpers here do the common parts: the shell (`clone_module`), grouped
convolutions and per-channel norms cut in blocks of one expert's channels, and composite modules whose
expert-axis children each know how to narrow themselves (`select_children`).

The narrowed modules are for inference (`M4oEUNet` builds them in eval, without gradients): their sliced
tensors are copies that do not require a gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["clone_module", "rebuild_container", "expert_blocks", "narrow_parameter", "select_grouped_conv",
           "select_channel_norm", "select_children"]


def clone_module(module: nn.Module, **replacements) -> nn.Module:
    """A new module of `module`'s class holding the same attributes, parameters, buffers and children (shared,
    not copied) and no hooks, with `replacements` (attributes, parameters, buffers or children) set on it."""
    new = module.__class__.__new__(module.__class__)
    nn.Module.__init__(new)
    fresh = set(new.__dict__)  # the module's own bookkeeping (hooks, parameter dicts): kept empty
    for key, value in module.__dict__.items():
        if key not in fresh:
            new.__dict__[key] = value
    new._parameters.update(module._parameters)
    new._buffers.update(module._buffers)
    new._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
    new._modules.update(module._modules)
    new.training = module.training
    for key, value in replacements.items():
        setattr(new, key, value)
    return new


def rebuild_container(container: nn.Module, modules: Sequence[nn.Module]) -> nn.Module:
    """A container of `container`'s class (ModuleList, Sequential) holding `modules`, in its train/eval mode."""
    new = type(container)(*modules) if isinstance(container, nn.Sequential) else type(container)(modules)
    new.training = container.training
    return new


def expert_blocks(indices: Sequence[int], width: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions of the experts `indices` along an axis holding E blocks of `width`: (len(indices) * width,)."""
    start = torch.as_tensor(list(indices), dtype=torch.long, device=device) * width
    return (start[:, None] + torch.arange(width, device=device)).flatten()


def narrow_parameter(tensor: torch.Tensor | None, dim: int, index: torch.Tensor) -> nn.Parameter | None:
    """The entries `index` of `tensor` along `dim`, as a parameter for inference (no gradient)."""
    if tensor is None:
        return None
    return nn.Parameter(tensor.detach().index_select(dim, index.to(tensor.device)), requires_grad=False)


def select_grouped_conv(conv: nn.Module, indices: Sequence[int]) -> nn.Module:
    """A grouped convolution of E experts (`groups` = E) narrowed to the experts `indices`."""
    k, groups = len(indices), conv.groups
    rows = expert_blocks(indices, conv.out_channels // groups, conv.weight.device)
    return clone_module(conv, weight=narrow_parameter(conv.weight, 0, rows),
                        bias=narrow_parameter(conv.bias, 0, rows), groups=k,
                        in_channels=conv.in_channels // groups * k, out_channels=conv.out_channels // groups * k)


def select_channel_norm(norm: nn.Module, indices: Sequence[int], num_experts: int) -> nn.Module:
    """A per-channel norm (instance or batch norm) over E experts' channels narrowed to the experts `indices`."""
    width = norm.num_features // num_experts
    index = expert_blocks(indices, width)
    stats = {name: getattr(norm, name).index_select(0, index.to(getattr(norm, name).device))
             for name in ("running_mean", "running_var") if getattr(norm, name, None) is not None}
    return clone_module(norm, weight=narrow_parameter(norm.weight, 0, index),
                        bias=narrow_parameter(norm.bias, 0, index), num_features=width * len(indices), **stats)


def select_children(module: nn.Module, indices: Sequence[int], **replacements) -> nn.Module:
    """`module` narrowed to the experts `indices` by narrowing its children that have `select_experts` (also
    inside a ModuleList) and sharing the others (activations, DropPath); updates `num_experts` where it has one."""
    children = {}
    for name, child in module.named_children():
        if hasattr(child, "select_experts"):
            children[name] = child.select_experts(indices)
        elif isinstance(child, nn.ModuleList):
            children[name] = rebuild_container(child, [c.select_experts(indices) if hasattr(c, "select_experts")
                                                       else c for c in child])
    if hasattr(module, "num_experts"):
        children["num_experts"] = len(indices)
    return clone_module(module, **children, **replacements)
