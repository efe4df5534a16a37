"""What `moe_nnunet bench` and the memory simulation measure: one network as plans describe it
(`NetworkSpec`), and the networks measured together on one input (`BenchmarkSetup`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["NetworkSpec", "BenchmarkSetup"]


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
