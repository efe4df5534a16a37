"""Shared fixtures: an nnU-Net folder layout in a temporary directory, a tiny multi-channel dataset, its plans and
the trained models several test files use (session-scoped: each is made once, whichever file asks first).

With pytest-xdist (`scripts/test.sh` runs two workers, one test file per worker at a time), the workers share
one nnU-Net folder layout: whichever worker first needs the dataset, its plans or a trained model makes it under
a file lock while the others wait, so nothing is trained twice. Tests that change a shared model work on a copy
in a results folder of their own (`NNUNetEnv.with_results`).
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

BIN = Path(sys.executable).parent
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under pytest-xdist, else None
# with two workers on two cores, each process computes with one thread, and threads that wait sleep instead of
# spinning (nnU-Net's CPU training sets torch's threads to the core count whatever it is told)
THREAD_ENV = {"OMP_NUM_THREADS": "1" if WORKER else "2", "OMP_WAIT_POLICY": "PASSIVE"}
if WORKER:
    import torch

    torch.set_num_threads(1)
TINY_ID = 990
# the test files, costliest first (seconds on 2 cores): scripts/test.sh hands them to its two xdist workers in this
# order, so that no long file starts last while the other worker has nothing left. The first two run side by side:
# the GPU check's dry run needs no shared model, test_modalities makes the session's `planned` and `trained`
FILE_ORDER = ("test_gpu_check.py", "test_modalities.py", "test_compare.py", "test_workflow.py", "test_end_to_end.py",
              "test_merge.py", "test_partial_labels.py", "test_benchmark.py", "test_demo.py", "test_memory.py",
              "test_network.py", "test_distributed.py", "test_combine.py", "test_bad_input.py", "test_cv.py",
              "test_datasets.py", "test_report.py", "test_discovery.py", "test_checkpoint_safety.py")
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
                        nnUNet_n_proc_DA="2", nnUNet_def_n_proc="1", **THREAD_ENV)

    def with_results(self, results: Path, *models: Path) -> "NNUNetEnv":
        """The same raw and preprocessed data with another results folder, holding copies of `models` (model
        folders of this environment, checkpoints included): for tests that change a model the session shares."""
        other = object.__new__(NNUNetEnv)
        other.raw, other.preprocessed, other.results = self.raw, self.preprocessed, Path(results)
        other.env = dict(self.env, nnUNet_results=str(other.results))
        for model in models:
            shutil.copytree(model, other.results / model.relative_to(self.results))
        other.results.mkdir(parents=True, exist_ok=True)
        return other

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

    def train_in_process(self, fold: str, trainer: str, plans: str, npz: bool = True, dataset: int = TINY_ID) -> Path:
        """`nnUNetv2_train DATASET 3d_fullres FOLD -tr TRAINER -p PLANS -device cpu [--npz]` as nnU-Net's own
        `run_training` in this process, for models whose training through the command line is not what a test
        is about (the stock command itself is run by the `trained` fixture and the workflow tests). Returns the
        model folder."""
        import importlib

        import torch
        from nnunetv2.run.run_training import run_training

        trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")

        with pytest.MonkeyPatch.context() as mp:
            for name, value in self.env.items():
                if name.startswith("nnUNet_"):
                    mp.setenv(name, value)
            mp.setenv("nnUNet_n_proc_DA", "0")
            # the validation's export pool, as nnUNet_def_n_proc=1 sets it in the stock command (read at import)
            mp.setattr(trainer_module, "default_num_processes", 1)
            run_training(str(dataset), "3d_fullres", fold, trainer, plans, export_validation_probabilities=npz,
                         device=torch.device("cpu"))
        return next(self.results.glob(f"Dataset{dataset:03d}_*")) / f"{trainer}__{plans}__3d_fullres"


def pytest_collection_modifyitems(config, items):
    """Files in `FILE_ORDER` (the rest after them, alphabetically), each file's tests in their own order."""
    rank = {name: i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path.name))


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's temporary folder, or under pytest-xdist the one folder all workers of the run share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if WORKER else base


def made_once(root: Path, name: str, make: Callable[[], object]) -> None:
    """Run `make` unless an earlier call (in this process or another xdist worker) finished it; concurrent
    callers wait for the first one. A failed `make` leaves nothing marked done, so the next caller tries again."""
    from filelock import FileLock

    done = root / f".{name}.done"
    with FileLock(str(root / f".{name}.lock")):
        if not done.is_file():
            make()
            done.touch()


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> NNUNetEnv:
    return NNUNetEnv(_shared_root(tmp_path_factory) / "nnunet")


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_env) -> Path:
    """The synthetic 3-channel phantom, small enough to train on CPU in seconds (10 cases, 24x40x40)."""
    from moe_nnunet.datasets.phantom import build_phantom

    folder = nnunet_env.raw / f"Dataset{TINY_ID}_TinyPhantom"
    made_once(nnunet_env.raw.parent, "tiny_dataset", lambda: build_phantom(
        nnunet_env.raw, TINY_ID, name="TinyPhantom", num_cases=10, shape=(24, 40, 40), spacing=(2.0, 1.0, 1.0)))
    return folder


class ForkingMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside nnU-Net's worker pools: hands out "fork" contexts where it
    asks for "spawn", so a pool does not start a fresh interpreter (and import torch again) per worker. What the
    workers compute is unchanged."""

    def __getattr__(self, name: str):
        return getattr(multiprocessing, name)

    @staticmethod
    def get_context(method: str | None = None):
        return multiprocessing.get_context("fork")


def forked_pools(mp: pytest.MonkeyPatch, *modules) -> None:
    """nnU-Net's pools in `modules` fork instead of spawning, where the platform can fork."""
    if "fork" in multiprocessing.get_all_start_methods():
        for module in modules:
            mp.setattr(module, "multiprocessing", ForkingMultiprocessing())


def _plan(nnunet_env: NNUNetEnv, preprocessed: Path) -> None:
    """nnU-Net's and our plans of the phantom and its preprocessing, in this process (`plan_phantom`: what
    `nnUNetv2_plan_and_preprocess --no_pp`, `moe_nnunet plan` and `nnUNetv2_preprocess` do; those commands
    themselves run in tests/test_compare.py, `moe_nnunet plan`'s dataset checks in tests/test_bad_input.py)."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from moe_nnunet.datasets.phantom import plan_phantom

    with pytest.MonkeyPatch.context() as mp:
        for name, value in nnunet_env.env.items():
            if name.startswith("nnUNet_"):
                mp.setenv(name, value)
        forked_pools(mp, fingerprint_extractor, default_preprocessor)
        assert plan_phantom(TINY_ID, "3d_fullres", 1) == ["nnUNetPlans", PLANS]
    # nnU-Net's 5-fold split, written now rather than by whichever training starts first
    cases = sorted(f.name[:-len(".pkl")] for f in (preprocessed / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    save_json(generate_crossval_split(cases, seed=12345, n_splits=5), str(preprocessed / "splits_final.json"))


@pytest.fixture(scope="session")
def planned(nnunet_env, tiny_dataset):
    """Stock fingerprint + nnU-Net plans, then our planner and the stock preprocessing of its plans. Our 3d_fullres
    shares nnU-Net's preprocessed data (`nnUNetPlans_3d_fullres`), so the one preprocessing serves both plans."""
    preprocessed = nnunet_env.preprocessed / tiny_dataset.name
    made_once(nnunet_env.raw.parent, "planned", lambda: _plan(nnunet_env, preprocessed))
    return preprocessed


@pytest.fixture(scope="session")
def trained(nnunet_env, planned) -> Path:
    """Fold 0 of the M4oE debug model, trained by the stock `nnUNetv2_train` (--npz: cross-validation ready)."""
    made_once(nnunet_env.raw.parent, "trained", lambda: nnunet_env.run(
        "nnUNetv2_train", str(TINY_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--npz"))
    return nnunet_env.results / planned.name / f"{TRAINER}__{PLANS}__3d_fullres"


BASELINE = "nnUNetTrainerDebug"  # nnU-Net's own network and trainer, on the same debug schedule


@pytest.fixture(scope="session")
def baseline_trained(nnunet_env, planned) -> Path:
    """Fold 0 of nnU-Net's own network on nnU-Net's plans (debug schedule, --npz), trained in this process: the
    second expert of the merge tests and the model M4oE is cross-validated beside."""
    made_once(nnunet_env.raw.parent, "baseline_trained",
              lambda: nnunet_env.train_in_process("0", BASELINE, "nnUNetPlans"))
    return nnunet_env.results / planned.name / f"{BASELINE}__nnUNetPlans__3d_fullres"
