"""Shared fixtures: an nnU-Net folder layout in a temporary directory and a tiny multi-channel dataset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY_ID = 990
PLANS = "nnUNetM4oEPlans"
TRAINER = "nnUNetTrainerM4oE_debug"


class NNUNetEnv:
    """nnU-Net's three folders plus the environment the stock commands need to find our trainers."""

    def __init__(self, root: Path) -> None:
        self.raw, self.preprocessed, self.results = root / "raw", root / "preprocessed", root / "results"
        for p in (self.raw, self.preprocessed, self.results):
            p.mkdir(parents=True, exist_ok=True)
        from moe_nnunet.discovery import ext_trainer_dir
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                        nnUNet_results=str(self.results), nnUNet_extTrainer=str(ext_trainer_dir()),
                        nnUNet_n_proc_DA="2", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")

    def run(self, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        """Run a console script of this environment (nnUNetv2_*, moe_nnunet) and capture its output."""
        exe = BIN / cmd[0]
        env = self.env
        if cmd[0] == "nnUNetv2_train" or cmd[:2] == ("moe_nnunet", "cv"):
            # tiny runs: data augmentation in the training process instead of spawning workers (nnU-Net's planner
            # cannot take 0 here, it sets torch's thread count from it)
            env = {**env, "nnUNet_n_proc_DA": "0"}
        proc = subprocess.run([str(exe), *cmd[1:]], env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                 f"STDERR:\n{proc.stderr[-4000:]}")
        return proc


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> NNUNetEnv:
    return NNUNetEnv(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_env) -> Path:
    """The synthetic 3-channel phantom, small enough to train on CPU in seconds (10 cases, 24x40x40)."""
    from moe_nnunet.datasets.phantom import build_phantom
    return build_phantom(nnunet_env.raw, TINY_ID, name="TinyPhantom", num_cases=10, shape=(24, 40, 40),
                         spacing=(2.0, 1.0, 1.0))


@pytest.fixture(scope="session")
def planned(nnunet_env, tiny_dataset):
    """Stock fingerprint + nnU-Net plans + preprocessing, then our planner and preprocessing."""
    nnunet_env.run("nnUNetv2_plan_and_preprocess", "-d", str(TINY_ID), "-c", "3d_fullres", "-np", "2",
                   "--verify_dataset_integrity")
    out = nnunet_env.run("moe_nnunet", "plan", "-d", str(TINY_ID))
    assert f"nnUNetv2_preprocess -d {TINY_ID} -plans_name {PLANS}" in out.stdout
    nnunet_env.run("nnUNetv2_preprocess", "-d", str(TINY_ID), "-plans_name", PLANS, "-c", "3d_fullres", "-np", "2")
    return nnunet_env.preprocessed / tiny_dataset.name


@pytest.fixture(scope="session")
def trained(nnunet_env, planned):
    nnunet_env.run("nnUNetv2_train", str(TINY_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
                   "-device", "cpu", "--npz")
    return nnunet_env.results / planned.name / f"{TRAINER}__{PLANS}__3d_fullres"
