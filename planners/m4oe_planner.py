"""Experiment planner for the M4oE network, built on nnU-Net's default planner."""
from __future__ import annotations

import warnings
from typing import List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from moe_nnunet.datasets.combine import experts_from_dataset_json
from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
from moe_nnunet.networks.m4oe_unet import M4oEUNet
from moe_nnunet.profiling.memory import training_memory_in_planner_units

__all__ = ["M4oEPlanner"]


class M4oEPlanner(ExperimentPlanner):
    """nnU-Net's planning (spacing, normalisation, topology, patch and batch size) for `M4oEUNet`.

    nnU-Net shrinks the patch until the network's memory estimate fits the GPU-memory target. Here the
    estimate is the peak memory of one of our training steps at nnU-Net's reference batch size (2 in 3D,
    12 in 2D), counted on fake tensors by `moe_nnunet.profiling.memory.simulate_training_memory` (16-bit autocast,
    deep supervision, AdamW as our trainers), and handed to nnU-Net in its units: a plan then fits when
    that peak at batch 2 (3D) is at most the target, and nnU-Net's batch-size rule scales from there. So
    the experts' cost decides the patch size. Should the simulation fail for an architecture, the
    network's own `compute_conv_feature_map_size` count is used, with a warning. Patches stay divisible
    by the total stride and every stage's attention window is chosen to tile its feature map
    (`moe_nnunet.networks.config.choose_window`). One expert per `channel_names` entry of dataset.json, or,
    for a dataset written by `moe_nnunet combine`, one expert per modality tag, each reading channel 0
    (`moe_nnunet.datasets.combine.experts_from_dataset_json`).

    2d and 3d_fullres reuse nnU-Net's preprocessed data (`nnUNetPlans_<config>`) because resampling and
    normalisation are nnU-Net's; 3d_lowres, whose spacing depends on the patch size, gets its own.

    Default GPU-memory target: 8 GB, as nnU-Net's ResEnc-M preset (`-gpu_memory_target` to change).
    """

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetM4oEPlans",
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = M4oEUNet
        self.expert_channels, self.expert_names = experts_from_dataset_json(self.dataset_json)

    def _moe_kwargs(self, patch_size, arch_kwargs: dict) -> dict:
        return m4oe_arch_kwargs(patch_size, arch_kwargs, len(self.dataset_json["channel_names"]),
                                self.expert_names, self.expert_channels)

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name,
                                   arch_kwargs, arch_kwargs_req_import):
        """Simulated training peak at the reference batch size, in nnU-Net's units (see the class docstring)."""
        from moe_nnunet.profiling.spec import NetworkSpec

        patch = [int(i) for i in patch_size]
        kwargs = self._moe_kwargs(patch, arch_kwargs)
        if len(patch) == 2:
            ref_value, ref_bs = self.UNet_reference_val_2d, self.UNet_reference_val_corresp_bs_2d
        else:
            ref_value, ref_bs = self.UNet_reference_val_3d, self.UNet_reference_val_corresp_bs_3d
        spec = NetworkSpec("ours", M4OE_NETWORK_CLASS, kwargs, list(arch_kwargs_req_import), input_channels,
                           output_channels, "planner")
        try:
            return training_memory_in_planner_units(spec, patch, ref_value, ref_bs,
                                                    self.UNet_reference_val_corresp_GB)
        except Exception as error:  # noqa: BLE001 - any failure falls back to nnU-Net's way of counting
            warnings.warn(f"moe_nnunet planner: simulating the training memory for patch {patch} failed "
                          f"({type(error).__name__}: {error}); using compute_conv_feature_map_size instead.")
            return ExperimentPlanner.static_estimate_VRAM_usage(patch, input_channels, output_channels,
                                                                arch_class_name, kwargs, arch_kwargs_req_import)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        arch = plan["architecture"]
        arch["network_class_name"] = M4OE_NETWORK_CLASS
        arch["arch_kwargs"] = self._moe_kwargs([int(i) for i in np.asarray(plan["patch_size"])],
                                               arch["arch_kwargs"])
        return plan

    def generate_data_identifier(self, configuration_name: str) -> str:
        if configuration_name in ("2d", "3d_fullres"):
            return "nnUNetPlans_" + configuration_name
        return self.plans_identifier + "_" + configuration_name
