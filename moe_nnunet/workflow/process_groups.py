"""Child programs that leave nothing behind: each in a process group of its own, the whole group ended when it
finishes or when the command that started it stops.

`nnUNetv2_train` starts `nnUNet_n_proc_DA` data-augmentation workers. When the training process dies without
cleaning up (SIGKILL, out of memory), those workers are re-parented to init and keep running, holding memory and
cores. A program started by `ProcessGroups.start` leads a new session (`start_new_session=True`), so it and every
process it forks share one process group; `ProcessGroups.reap` sends SIGKILL to whatever is left of that group once
the program has exited, and leaving the `with` block (normally, on an exception, on Ctrl-C, or on SIGTERM, which
is turned into `SystemExit` while the block runs) first asks running programs to stop (SIGTERM, then SIGKILL after
a grace period) and then reaps them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Sequence

__all__ = ["ProcessGroups"]


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group no longer has any process."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


class ProcessGroups:
    """Starts programs each in its own process group and ends every group it started when the block ends.

        with ProcessGroups() as groups:
            proc = groups.start(["nnUNetv2_train", ...], env=env)
            returncode = groups.wait(proc)   # the program's exit code; its leftover workers are gone
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self._procs: list[subprocess.Popen] = []
        self._previous_sigterm = None

    def __enter__(self) -> "ProcessGroups":
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._sigterm)
        return self

    @staticmethod
    def _sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc) -> None:
        try:
            self.end_all()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def start(self, cmd: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """`subprocess.Popen(cmd, **popen_kwargs)` as the leader of a new process group."""
        proc = subprocess.Popen(list(cmd), start_new_session=True, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen) -> int:
        """Wait for `proc` to exit, then end what is left of its group. Returns its exit code."""
        returncode = proc.wait()
        self.reap(proc)
        return returncode

    def reap(self, proc: subprocess.Popen) -> None:
        """SIGKILL to every process left in the group of `proc` (which has exited)."""
        _signal_group(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def end_all(self) -> None:
        """Ask every program still running to stop (SIGTERM to its group), SIGKILL what is left after the grace
        period, and reap every group."""
        running = [p for p in self._procs if p.poll() is None]
        for proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in list(self._procs):
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self._procs.clear()
