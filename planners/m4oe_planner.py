"""Experiment planner for the M4oE network, built on nnU-Net's default planner."""
from __future__ import annotations

from typing import List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from moe_nnunet.datasets.combine import experts_from_dataset_json
from moe_nnunet.networks.config import M4OE_NETWORK_CLASS, m4oe_arch_kwargs
from moe_nnunet.networks.m4oe_unet import M4oEUNet

__all__ = ["M4oEPlanner"]


class M4oEPlanner(ExperimentPlanner):
    """nnU-Net's planning (spacing, normalisation, topology, patch and batch size) for `M4oEUNet`.

    nnU-Net shrinks the patch until the network's activation estimate fits the GPU-memory target; here
    that estimate is our network's own `compute_conv_feature_map_size` with its Swin settings for each
    candidate patch, so the experts' cost decides the patch size. Patches stay divisible by the total stride
    and every stage's attention window is chosen to tile its feature map
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
        return ExperimentPlanner.static_estimate_VRAM_usage(
            patch_size, input_channels, output_channels, arch_class_name,
            self._moe_kwargs(patch_size, arch_kwargs), arch_kwargs_req_import)

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
