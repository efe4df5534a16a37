"""Programs our commands start (`moe_nnunet cv`'s trainings, the steps of `compare` and the demo) leave no process
behind: a training that dies leaves workers (as nnUNetv2_train's data-augmentation workers after SIGKILL), and our
command stopped with SIGTERM or Ctrl-C ends its running step and everything that step started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moe_nnunet.workflow.process_groups import ProcessGroups

# a stand-in for nnUNetv2_train: starts a worker that would outlive it, writes both pids, then works
TRAINING = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {worker.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent, which may be a container's init, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _pids(path: Path, timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    while not path.is_file():
        assert time.time() < deadline, "the stand-in training never started"
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def _gone(pids: list[int], timeout: float = 20) -> bool:
    deadline = time.time() + timeout
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_a_killed_training_leaves_no_worker(tmp_path):
    pids_file = tmp_path / "pids"
    with ProcessGroups() as groups:
        proc = groups.start([sys.executable, "-c", TRAINING, str(pids_file)])
        training, worker = _pids(pids_file)
        os.kill(training, signal.SIGKILL)            # as the kernel's OOM killer or `kill -9` would
        assert groups.wait(proc) == -signal.SIGKILL
        assert _gone([worker]), "the worker outlived its training"


def test_stopping_our_command_ends_its_running_step_and_what_it_started(tmp_path):
    """`Steps.run` (compare, demo) in a program that receives SIGTERM: the step and its worker end with it."""
    pids_file = tmp_path / "pids"
    runner = (f"from pathlib import Path; from moe_nnunet.workflow.steps import Steps; "
              f"root = Path({str(tmp_path)!r}); "
              f"Steps(root / 'logs', root / 'raw', root / 'pre', root / 'res', 'test')"
              f".run('train', False, 'python', '-c', {TRAINING!r}, {str(pids_file)!r})")
    command = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        pids = _pids(pids_file)
        command.send_signal(signal.SIGTERM)
        command.wait(timeout=60)
    finally:
        command.kill()
    assert command.returncode == 128 + signal.SIGTERM, command.stderr.read()[-2000:]
    assert _gone(pids), "the step or its worker outlived the stopped command"
