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


def test_help_lists_every_subcommand(capsys):
    """Every command of the registry (`moe_nnunet.cli.COMMANDS`) is a module of `moe_nnunet.commands` (none is
    skipped as missing), is listed by `moe_nnunet --help`, and answers its own `--help`; and every command module
    is in the registry."""
    import importlib
    import pkgutil

    import pytest

    import moe_nnunet.commands
    from moe_nnunet.cli import COMMANDS, build_parser, main

    modules = {m.name for m in pkgutil.iter_modules(moe_nnunet.commands.__path__)}
    assert modules == set(COMMANDS) and len(COMMANDS) == len(set(COMMANDS)), sorted(modules ^ set(COMMANDS))
    for name in COMMANDS:
        assert callable(importlib.import_module(f"moe_nnunet.commands.{name}").register), name
    registered = build_parser()._subparsers._group_actions[0].choices
    assert list(registered) == list(COMMANDS)

    out = subprocess.run([sys.executable, "-m", "moe_nnunet", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    listed = out.stdout.split("COMMAND", 1)[1]
    for command in COMMANDS:
        assert f"    {command} " in listed or f"    {command}\n" in listed, command
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0, command
        assert capsys.readouterr().out.startswith(f"usage: moe_nnunet {command}"), command
