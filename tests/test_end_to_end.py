"""The user's path through nnU-Net's stock programs, on CPU, with the debug trainer.

fingerprint -> `moe_nnunet plan` -> nnUNetv2_preprocess -> nnUNetv2_train -tr nnUNetTrainerM4oE_debug
-> nnUNetv2_predict; and the same trainer on nnU-Net's own plans (no -p).
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import SimpleITK as sitk
import torch

from conftest import PLANS, TINY_ID, TRAINER


def test_plans_name_our_network_with_swin_valid_patch(planned):
    plans = json.loads((planned / f"{PLANS}.json").read_text())
    assert plans["experiment_planner_used"] == "M4oEPlanner"
    for cfg in ("2d", "3d_fullres"):
        c = plans["configurations"][cfg]
        arch = c["architecture"]
        assert arch["network_class_name"] == "moe_nnunet.networks.m4oe_unet.M4oEUNet"
        kw = arch["arch_kwargs"]
        assert kw["expert_names"] == ["T1", "T2", "FLAIR"] and kw["expert_channels"] == [[0], [1], [2]]
        total = np.prod(np.array(kw["strides"]), axis=0)
        assert all(p % t == 0 for p, t in zip(c["patch_size"], total)), "patch not divisible by total stride"
        size = list(c["patch_size"])
        for stride, window, depth in zip(kw["strides"], kw["window_sizes"], kw["swin_depths"]):
            size = [s // k for s, k in zip(size, stride)]
            if depth:
                assert all(s % w == 0 or w == 8 for s, w in zip(size, window)), (size, window)
        # 2d and 3d_fullres share nnU-Net's preprocessed data
        assert c["data_identifier"] == f"nnUNetPlans_{cfg}"


def test_unknown_planner_lists_the_available_ones(nnunet_env, planned):
    out = nnunet_env.run("moe_nnunet", "plan", "-d", str(TINY_ID), "-pl", "NoSuchPlanner", check=False)
    assert out.returncode != 0 and "M4oEPlanner" in out.stderr


def test_unknown_trainer_is_a_clear_error(nnunet_env, planned):
    out = nnunet_env.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerM4oE_nope",
                         "-p", PLANS, "-device", "cpu", check=False)
    assert out.returncode != 0 and "nnUNetTrainerM4oE_nope" in (out.stdout + out.stderr)


def test_training_writes_checkpoint_and_validation(trained):
    fold = trained / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3", "4"}
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    # three experts (T1, T2, FLAIR) batched into one module: the stem is one grouped convolution over 3 experts
    stem = ckpt["network_weights"]["encoder.experts.stages.0.blocks.0.weight"]
    widths = ckpt["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][
        "expert_features_per_stage"]
    assert stem.shape[0] == 3 * max(4, widths[0] // 4)  # _debug trainers build a quarter of the planned width
    log = "".join(f.read_text() for f in sorted(fold.glob("training_log_*.txt")))
    assert "mixture weight (expert curriculum): 0.000" in log and "gate weights" in log


def test_stock_predict_writes_valid_segmentations(nnunet_env, trained, tiny_dataset, tmp_path):
    images = tiny_dataset / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    cases = sorted({p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz")})[:2]
    for case in cases:
        for f in images.glob(f"{case}_*.nii.gz"):
            shutil.copy(f, inp / f.name)
    out = tmp_path / "out"
    nnunet_env.run("nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(TINY_ID), "-c", "3d_fullres",
                   "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1",
                   "-nps", "1")
    for case in cases:
        ref = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert seg.GetSize() == ref.GetSize()
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(seg.GetSpacing(), ref.GetSpacing()))
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(seg.GetOrigin(), ref.GetOrigin()))
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3, 4}


def test_trainer_runs_on_stock_nnunet_plans_as_fold_all(nnunet_env, planned, tiny_dataset, tmp_path):
    """Only the trainer flag: nnU-Net's own plans (PlainConvUNet) become an M4oE network of the same topology.
    Fold `all` trains on every case (and validates on them, as nnU-Net does; trained by nnU-Net's `run_training` in
    this process, the stock command is the `trained` fixture's); `nnUNetv2_predict -f all` uses it."""
    fold = nnunet_env.train_in_process("all", TRAINER, "nnUNetPlans", npz=False) / "fold_all"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("encoder.gates.") for k in ckpt["network_weights"])
    cases = json.loads((fold / "validation" / "summary.json").read_text())["metric_per_case"]
    assert len(cases) == len(list((tiny_dataset / "labelsTr").glob("*.nii.gz")))
    inp = tmp_path / "in"
    inp.mkdir()
    for f in (tiny_dataset / "imagesTr").glob("TinyPhantom_000_*.nii.gz"):
        shutil.copy(f, inp / f.name)
    nnunet_env.run("nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-d", str(TINY_ID), "-c",
                   "3d_fullres", "-f", "all", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1",
                   "-nps", "1")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "TinyPhantom_000.nii.gz")))
    assert seg.shape == (24, 40, 40) and set(np.unique(seg)) <= {0, 1, 2, 3, 4}
