"""nnU-Net's own trainer lookup finds our trainers through `moe_nnunet trainer_path`, as one class object."""
from __future__ import annotations

import subprocess
import sys

from moe_nnunet.discovery import ext_trainer_dir

LOOKUP = """
import moe_nnunet.trainers as ours
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
for name in ours.__all__:
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(ours, name), (name, found.__module__)
    assert found.__module__.startswith("moe_nnunet.trainers."), found.__module__
print("OK", len(ours.__all__))
"""


def test_stock_lookup_returns_the_installed_class(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_NNUNET_HOME", str(tmp_path))
    folder = ext_trainer_dir()
    assert folder.is_relative_to(tmp_path) and "site-packages" not in str(folder)
    out = subprocess.run([sys.executable, "-c", LOOKUP], capture_output=True, text=True,
                         env={**__import__("os").environ, "nnUNet_extTrainer": str(folder)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout


def test_trainer_path_command_prints_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_NNUNET_HOME", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "moe_nnunet", "trainer_path"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "nnunet_ext_trainers")


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "moe_nnunet", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("plan", "trainer_path", "datasets", "demo", "bench"):
        assert command in out.stdout, command
