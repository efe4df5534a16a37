"""scripts/gpu_check.sh, the one-call GPU check, in the parts a CPU can run: its dry run goes through every step
(tiny phantom, one epoch of two iterations, a tiny benchmark) and reports each with a status and its figures; without
a GPU and without `--cpu-dry-run` it refuses at once; a step that fails, times out, or exits 0 without nnU-Net's
defaults on a GPU fails the check."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_nnunet.profiling import gpu_check
from moe_nnunet.profiling.gpu_check import STEPS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NAMES = [name for name, _ in STEPS]


def _env(tmp_path: Path, **extra: str) -> dict:
    """This test's Python environment for the script, nnU-Net's folders left to it, the trainer shim in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    return {**env, "MOE_NNUNET_VENV": str(Path(sys.executable).parents[1]), "MOE_NNUNET_HOME": str(tmp_path / "home"),
            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **extra}


def test_dry_run_reports_every_step_with_its_figures(tmp_path):
    out = tmp_path / "gpu_check_output"
    # the dry run's budget (300 s) and step limits are for an idle machine; a busy one gets more
    env = _env(tmp_path, GPU_CHECK_BUDGET_S="1200", GPU_CHECK_STEP_LIMIT_SCALE="4")
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", str(out)], env=env, capture_output=True, text=True,
                          timeout=1400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    table = proc.stdout.split("moe_nnunet GPU check (cpu-dry-run)", 1)[1]
    for name in NAMES:  # one row per step, each with its status
        assert re.search(rf"^{name} +pass +[0-9.]+ ", table, re.M), (name, table)
    assert "PASSED: 10 pass" in table

    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "cpu-dry-run" and result["passed"] is True
    assert [s["name"] for s in result["steps"]] == NAMES and all(s["status"] == "pass" for s in result["steps"])
    steps = {s["name"]: s["figures"] for s in result["steps"]}
    for name in ("train_m4oe", "train_nnunet", "train_merged"):  # nnUNetv2_train, one epoch, validated
        figures = steps[name]
        assert figures["epochs"] == 1 and figures["s_per_epoch"] > 0 and 0 <= figures["dice"] <= 1, (name, figures)
        assert figures["device"] == "cpu" and figures["compile"] is False  # nnU-Net compiles on CUDA only
    assert steps["train_m4oe"]["mirroring_axes"] == "012"  # nnU-Net's test-time mirroring kept
    # torchrun formed its process group of one; nnU-Net's DDP trainer itself needs CUDA
    assert steps["train_ddp"]["torchrun_world_size"] == 1 and steps["train_ddp"]["backend"] == "gloo"
    for name in ("bench_eager", "bench_compiled"):
        figures = steps[name]
        assert figures["ours_train_ms"] > 0 and figures["nnunet_train_ms"] > 0 and figures["ratio"] > 0
        assert figures["ours_train_mfu"] > 0  # against the dry run's nominal peak
    assert steps["sliding_window"]["ours_sliding_window_ms"] > 0 and steps["sliding_window"]["ratio"] > 0
    merged = out / "nnUNet_results" / "Dataset975_GpuCheckPhantom" / \
        "nnUNetTrainerMoEMerge_gpucheck__nnUNetMergedPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    assert merged.is_file()


def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "out"  # a GPU of this machine, if any, is hidden
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=_env(tmp_path, CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not out.exists()  # refused before anything was made


def _record_all(out: Path, **statuses: str) -> None:
    for name in NAMES:
        gpu_check.record(out, name, statuses.get(name, "pass"), 1.0, rc=0)


def test_a_step_that_did_not_pass_fails_the_check(tmp_path, capsys):
    _record_all(tmp_path, bench_compiled="timeout")
    (tmp_path / "steps" / "sliding_window.json").unlink()  # the script stopped before it
    assert gpu_check.report(tmp_path, "cpu-dry-run") == 1
    printed = capsys.readouterr().out
    assert re.search(r"^bench_compiled +timeout ", printed, re.M) and re.search(r"^sliding_window +not run ", printed, re.M)
    assert "FAILED" in printed
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["passed"] is False and [s["status"] for s in result["steps"]][-2:] == ["timeout", "not run"]


def test_on_a_gpu_a_training_without_nnunets_defaults_or_ddp_fails(tmp_path, capsys):
    """Exit 0 is not enough on a GPU: compile and GradScaler must be on, and the DDP run must be nnU-Net's DDP."""
    logs = tmp_path / "logs"
    logs.mkdir()
    on = "gpu_check: device=cuda:0 compile=True grad_scaler=True ddp_world_size=0 mirroring_axes=012\nEpoch time: 3.2 s\n"
    (logs / "on.log").write_text(on)
    (logs / "off.log").write_text(on.replace("compile=True", "compile=False"))
    _record_all(tmp_path)
    for name in ("train_m4oe", "train_nnunet", "train_merged"):
        gpu_check.record(tmp_path, name, "pass", 30.0, rc=0, log=str(logs / "on.log"))
    gpu_check.record(tmp_path, "train_ddp", "pass", 30.0, rc=0, log=str(logs / "on.log"))  # not under DDP
    gpu_check.record(tmp_path, "train_merged", "pass", 30.0, rc=0, log=str(logs / "off.log"))
    assert gpu_check.report(tmp_path, "gpu", device="test GPU") == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert steps["train_m4oe"]["status"] == "pass" and steps["train_m4oe"]["figures"]["s_per_epoch"] == 3.2
    ddp = on.replace("ddp_world_size=0", "ddp_world_size=1")
    (logs / "ddp.log").write_text(ddp)
    gpu_check.record(tmp_path, "train_ddp", "pass", 30.0, rc=0, log=str(logs / "ddp.log"))
    gpu_check.report(tmp_path, "gpu", device="test GPU")
    steps_now = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert steps_now["train_ddp"]["status"] == "pass" and steps_now["train_ddp"]["figures"]["ddp_world_size"] == 1
    assert steps["train_merged"]["status"] == "fail" and "defaults were not in force" in steps["train_merged"]["note"]
    assert steps["train_ddp"]["status"] == "fail" and "DDP path did not run" in steps["train_ddp"]["note"]
    assert "train_ddp: the trainer did not run under DDP at world size 1" in capsys.readouterr().out
