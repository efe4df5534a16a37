"""Trainer variants: each schedule sets attributes its trainer has; a misspelt schedule key stops the trainer
instead of adding an attribute nothing reads."""
from __future__ import annotations

import copy

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import moe_nnunet.trainers as shipped
from moe_nnunet.networks.merged import MERGED_NETWORK_CLASS
from moe_nnunet.trainers.merge import EXPERTS_KEY
from moe_nnunet.trainers.variants import DEBUG_SCHEDULE, _Scheduled

PLANS = {
    "dataset_name": "Dataset990_TinyPhantom", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
    "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {},
    "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"] * 2, "use_mask_for_norm": [False] * 2, "batch_dice": True,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
        "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities_kwargs": {},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": {}, "_kw_requires_import": []}}}}
DATASET = {"channel_names": {"0": "t1", "1": "t2"}, "labels": {"background": 0, "blob": 1}, "numTraining": 2,
           "file_ending": ".nii.gz"}


def make_trainer(cls: type, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    plans = copy.deepcopy(PLANS)
    if issubclass(cls, shipped.nnUNetTrainerMoEMerge):  # it refuses plans that are not merged ones
        config = plans["configurations"]["3d_fullres"]
        config["architecture"]["network_class_name"] = MERGED_NETWORK_CLASS
        config[EXPERTS_KEY] = []
    return cls({**plans, "continue_training": False}, "3d_fullres", 0, DATASET, torch.device("cpu"))


@pytest.mark.parametrize("name", [n for n in shipped.__all__ if issubclass(getattr(shipped, n), _Scheduled)])
def test_shipped_schedules_set_existing_attributes(name, tmp_path, monkeypatch):
    cls = getattr(shipped, name)
    trainer = make_trainer(cls, tmp_path, monkeypatch)
    assert cls.SCHEDULE and {k: getattr(trainer, k) for k in cls.SCHEDULE} == cls.SCHEDULE


class nnUNetTrainer_misspelt(_Scheduled, nnUNetTrainer):
    SCHEDULE = {**DEBUG_SCHEDULE, "num_epoch": 5}


def test_misspelt_schedule_key_raises_naming_it_and_the_class(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"nnUNetTrainer_misspelt\.SCHEDULE sets 'num_epoch', which is not an "
                                         r"attribute of the trainer"):
        make_trainer(nnUNetTrainer_misspelt, tmp_path, monkeypatch)
