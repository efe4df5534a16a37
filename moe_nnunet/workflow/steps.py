"""Run nnU-Net's stock programs and ours as steps, in one set of nnU-Net folders, for `moe_nnunet compare` and
`moe_nnunet demo`: each step a console script of this environment in a subprocess, its output appended to
logs/<step>.log, a progress bar while it runs, one summary line when it ends, and skipped when its output exists.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from moe_nnunet.discovery import ext_trainer_dir
from moe_nnunet.workflow.process_groups import ProcessGroups

__all__ = ["StepFailed", "Steps", "epochs_logged", "count_files"]


class StepFailed(RuntimeError):
    """A step exited with an error; the message names its log and shows its end."""


class Steps:
    """Steps run with nnU-Net's folders `raw`, `preprocessed` and `results` in their environment (and our trainers
    on `nnUNet_extTrainer`), their logs in `logs`, messages prefixed with `[tag]`."""

    def __init__(self, logs: Path, raw: Path, preprocessed: Path, results: Path, tag: str) -> None:
        self.logs, self.tag = Path(logs), tag
        self.logs.mkdir(parents=True, exist_ok=True)
        self.raw, self.pre, self.res = Path(raw), Path(preprocessed), Path(results)
        extra = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                        nnUNet_results=str(self.res),
                        nnUNet_extTrainer=os.pathsep.join(extra + [str(ext_trainer_dir())]))
        # nnU-Net's default of 8 worker processes for export, evaluation and preprocessing (each a fresh
        # interpreter importing torch) costs a minute per validation on a 2-core machine; 1 per 2 cores, at most 4
        self.env.setdefault("nnUNet_def_n_proc", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
        self.n_proc = self.env["nnUNet_def_n_proc"]
        self.seconds: dict[str, float] = {}

    def log(self, name: str) -> Path:
        return self.logs / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"

    def dataset_name(self, dataset_id: int | str) -> str | None:
        """The raw dataset folder's name for an id (Dataset<id>_Name), None before it is built."""
        found = sorted(p.name for p in self.raw.glob(f"Dataset{int(dataset_id):03d}_*"))
        return found[0] if found else None

    def run(self, name: str, done: bool, *cmd: str, total: int | None = None,
            progress: Callable[[], int] | None = None, unit: str = "it") -> None:
        """Run `cmd` (a console script of this environment) unless `done`, with a progress bar (`progress()` counts
        what is finished out of `total`; without them the bar shows the elapsed time). Raises StepFailed."""
        from tqdm import tqdm

        if done:
            print(f"[{self.tag}] {name}: already done, reused", flush=True)
            return
        log, start = self.log(name), time.time()
        # the step in a process group of its own, ended with whatever it started (nnU-Net's data-augmentation
        # workers) when it exits, fails or this command is stopped
        with open(log, "a") as f, ProcessGroups() as groups, \
                tqdm(total=total, desc=f"[{self.tag}] {name}", unit=unit, leave=False, file=sys.stdout,
                     bar_format=None if total else "{desc}: {elapsed}") as bar:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            proc = groups.start([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], env=self.env, stdout=f,
                                stderr=subprocess.STDOUT)
            while proc.poll() is None:
                time.sleep(1.0)
                if progress and total:
                    bar.update(min(progress(), total) - bar.n)
                else:
                    bar.refresh()
            groups.reap(proc)
        self.seconds[name] = round(time.time() - start, 1)
        if proc.returncode != 0:
            raise StepFailed(f"[{self.tag}] {name} failed (exit {proc.returncode}); the end of {log}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        print(f"[{self.tag}] {name}: done in {self.seconds[name]:.0f} s (log: {log})", flush=True)


def epochs_logged(log: Path) -> Callable[[], int]:
    """Counts the epochs nnU-Net's training has started according to its log (for a progress bar): the highest
    epoch number since the step's last start (the log keeps earlier runs of the step above a `$ command` line;
    a run resumed with --c goes on with nnU-Net's epoch numbers)."""
    pattern = re.compile(r": Epoch (\d+)\s*$", re.MULTILINE)

    def count() -> int:
        try:
            text = log.read_text(errors="replace").rsplit("\n$ ", 1)[-1]
        except FileNotFoundError:
            return 0
        return max((int(e) for e in pattern.findall(text)), default=-1) + 1
    return count


def count_files(folder: Path, pattern: str) -> Callable[[], int]:
    return lambda: len(list(folder.glob(pattern)))
