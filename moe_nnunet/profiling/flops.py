"""FLOP counting of a training step and a forward: torch's `FlopCounterMode` with formulas for what it
miscounts, and the counts per module of our network."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter", "flops_by_module"]


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


def flop_counter() -> FlopCounterMode:
    # module paths up to six names long, root included: down to encoder.experts.stages.<s>.<block>
    return FlopCounterMode(depth=6, display=False, custom_mapping=_FLOP_FORMULAS)


def flops_by_module(counts: dict[str, dict[Any, int]]) -> dict[str, int]:
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
