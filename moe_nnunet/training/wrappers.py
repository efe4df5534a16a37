"""The network a trainer holds, in and out of its DDP and torch.compile wrappers."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["unwrapped", "allow_unused_parameters"]


def unwrapped(network: nn.Module) -> nn.Module:
    """The network a trainer holds, without its DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    module = network.module if isinstance(network, DDP) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def allow_unused_parameters(network: DDP) -> DDP:
    """The DDP-wrapped module re-wrapped with `find_unused_parameters=True` (unchanged if it already is).

    DDP by default waits for a gradient of every parameter in every step and fails in the next step when
    one got none. An MoE network leaves some out by design: the experts' light heads after the curriculum,
    the heads of experts that have no sample of their modality in a rank's batch, the gates in stage 1 of
    the two-stage training. The replaced wrapper's reducer is released with it."""
    if network.find_unused_parameters:
        return network
    return DDP(network.module, device_ids=network.device_ids, output_device=network.output_device,
               find_unused_parameters=True)
