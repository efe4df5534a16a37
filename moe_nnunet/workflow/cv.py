"""Cross-validation runs: every fold of a model through `nnUNetv2_train`, then
`nnUNetv2_find_best_configuration`, on this machine or as a SLURM job array.

A fold's state is read from the files nnU-Net writes, so a run can be repeated after any stop and does
only what is left:

* `checkpoint_final.pth` and `validation/summary.json` (and the `.npz` files): done, skipped;
* `checkpoint_final.pth` without the validation: `nnUNetv2_train ... --val --npz`;
* `checkpoint_latest.pth` or `checkpoint_best.pth`: `nnUNetv2_train ... --c --npz` (resumes);
* nothing: `nnUNetv2_train ... --npz`.

`--npz` is always on: `nnUNetv2_find_best_configuration` ensembles the folds' validation probabilities.
On SLURM, each array task runs `moe_nnunet cv` for its one fold with this logic, so a resubmitted array
resumes its unfinished folds, and a job that depends on the array (`afterok`) picks the best configuration.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from moe_nnunet.workflow.process_groups import ProcessGroups

__all__ = ["FoldRun", "fold_status", "train_command", "find_best", "best_models", "run_local", "write_slurm_scripts",
           "submit_slurm", "visible_gpus"]

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class FoldRun:
    """One `nnUNetv2_train` of a cross-validation: dataset, configuration, fold, trainer and plans."""
    dataset: str
    configuration: str
    fold: str
    trainer: str
    plans: str

    def output_folder(self) -> Path:
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        return Path(get_output_folder(self.dataset, self.trainer, self.plans, self.configuration, self.fold))


def fold_status(folder: str | os.PathLike) -> str:
    """`done`, `validate`, `resume` or `train`: what is left of the fold whose output folder this is (see the
    module docstring)."""
    folder = Path(folder)
    if (folder / "checkpoint_final.pth").is_file():
        validation = folder / "validation"
        complete = (validation / "summary.json").is_file() and any(validation.glob("*.npz"))
        return "done" if complete else "validate"
    if (folder / "checkpoint_latest.pth").is_file() or (folder / "checkpoint_best.pth").is_file():
        return "resume"
    return "train"


def train_command(run: FoldRun, status: str, device: str, extra: Sequence[str] = ()) -> list[str]:
    """The `nnUNetv2_train` call that finishes this fold from `status`."""
    cmd = [str(BIN / "nnUNetv2_train"), run.dataset, run.configuration, run.fold, "-tr", run.trainer,
           "-p", run.plans, "-device", device, "--npz", *extra]
    return cmd + {"validate": ["--val"], "resume": ["--c"]}.get(status, [])


def find_best(dataset: str, models: Sequence[dict], folds: Sequence[str], num_processes: int | None = None) -> None:
    """nnU-Net's `find_best_configuration` over `models` (dicts of trainer, plans, configuration): the
    cross-validation Dice of each, of every pair's ensemble, postprocessing, and `inference_instructions.txt`.

    Unlike `nnUNetv2_find_best_configuration`, which takes every combination of its -tr, -p and -c lists,
    the models here are listed one by one, so an M4oE model (M4oE plans) can be compared and ensembled with
    nnU-Net's own (nnU-Net's plans).

    A dataset with partial labels (`moe_nnunet combine` of datasets that annotate different labels): each model's
    cross-validation summary is written first, scoring each label only on the cases whose dataset annotates it
    (`moe_nnunet.evaluation.partial_labels`), and nnU-Net's choice then reads those summaries (it keeps a
    summary it finds). Ensembles are left out there: nnU-Net scores an ensemble afresh, every label on every case,
    which would count correct predictions of unannotated structures as errors."""
    import json
    from pathlib import Path

    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.accumulate_cv_results import accumulate_cv_results
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string, get_output_folder

    from moe_nnunet.datasets.combine import annotated_label_values
    from moe_nnunet.evaluation.partial_labels import rescore_folder

    name = maybe_convert_to_dataset_name(dataset)
    num_processes = num_processes or default_num_processes
    folds = tuple(int(f) for f in folds)
    dataset_json = json.loads((Path(nnUNet_preprocessed) / name / "dataset.json").read_text())
    partial = annotated_label_values(dataset_json) is not None
    if partial:
        for m in models:
            folder = get_output_folder(name, m["trainer"], m["plans"], m["configuration"])
            merged = Path(folder) / f"crossval_results_folds_{folds_tuple_to_string(folds)}"
            accumulate_cv_results(folder, str(merged), folds, num_processes, overwrite=True)
            rescore_folder(merged, dataset_json)
        print(f"{name} has partial labels: each model's cross-validation scores each label only on the cases "
              f"that annotate it (summary.json, summary_per_dataset.json); ensembles are not considered")
    find_best_configuration(name, tuple(models), allow_ensembling=len(models) > 1 and not partial,
                            num_processes=num_processes, overwrite=not partial, folds=folds, strict=True)


def best_models(configurations: Sequence[str], trainer: str, plans: str, others: Sequence[str] = ()) -> list[dict]:
    """The models to compare: ours in each configuration, plus `others` written TRAINER:PLANS[:CONFIGURATION]
    (without a configuration: in each of `configurations`)."""
    models = [{"trainer": trainer, "plans": plans, "configuration": c} for c in configurations]
    for spec in others:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"--with {spec}: write another trained model as TRAINER:PLANS or "
                             f"TRAINER:PLANS:CONFIGURATION, e.g. nnUNetTrainer:nnUNetPlans:3d_fullres.")
        for c in parts[2:] or configurations:
            models.append({"trainer": parts[0], "plans": parts[1], "configuration": c})
    return models


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as values for CUDA_VISIBLE_DEVICES."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def _log(msg: str) -> None:
    print(f"moe_nnunet cv: {msg}", flush=True)


def run_local(runs: Sequence[FoldRun], device: str, train_args: Sequence[str] = ()) -> list[FoldRun]:
    """Finish every fold: in sequence, or with `device` cuda and several visible GPUs, one fold per GPU at a
    time. Returns the runs that failed (their logs are nnU-Net's, in each fold folder)."""
    todo = []
    for run in runs:
        status = fold_status(run.output_folder())
        if status == "done":
            _log(f"{run.configuration} fold {run.fold}: done ({run.output_folder()})")
        else:
            todo.append((run, status))
    gpus = visible_gpus() if device == "cuda" and "-num_gpus" not in train_args else []
    slots = gpus if len(gpus) > 1 else [None]  # None: one fold at a time, on whatever the device is
    failed: list[FoldRun] = []
    running: list[tuple[FoldRun, subprocess.Popen, str | None]] = []

    def wait_one(groups: ProcessGroups) -> None:
        run, proc, gpu = running.pop(0)
        if groups.wait(proc) != 0:
            failed.append(run)
            _log(f"{run.configuration} fold {run.fold}: nnUNetv2_train exited {proc.returncode}")
        slots.append(gpu)

    # each training in a process group of its own: a fold that dies, or this command stopped, leaves no
    # data-augmentation workers behind
    with ProcessGroups() as groups:
        for run, status in todo:
            if not slots:
                wait_one(groups)
            gpu = slots.pop(0)
            env = dict(os.environ) if gpu is None else dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
            cmd = train_command(run, status, device, train_args)
            where = "" if gpu is None else f" on GPU {gpu}"
            _log(f"{run.configuration} fold {run.fold}: {status}{where}: {shlex.join(cmd)}")
            running.append((run, groups.start(cmd, env=env), gpu))
            if gpu is None:
                wait_one(groups)
        while running:
            wait_one(groups)
    return failed


SLURM_ARRAY = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}
#SBATCH --output={log_dir}/%x_%A_%a.log
{resources}
# One fold of the cross-validation per array task: `moe_nnunet cv` trains it, resumes it (--c) or skips it,
# from the files nnU-Net has written. Resubmit this script to finish the folds a stop interrupted.
set -euo pipefail
{env}
CONFIGURATIONS=({configurations})
FOLDS=({folds})
exec {moe_nnunet} cv {common} --no_best \\
    -c "${{CONFIGURATIONS[$SLURM_ARRAY_TASK_ID]}}" --folds "${{FOLDS[$SLURM_ARRAY_TASK_ID]}}"{train_args}
"""

SLURM_BEST = """#!/bin/bash
#SBATCH --job-name={job_name}_best
#SBATCH --output={log_dir}/%x_%j.log
{resources}
# After every fold has finished: nnU-Net's choice of the best configuration (and ensemble).
set -euo pipefail
{env}
exec {moe_nnunet} cv {common} --best_only
"""

ENV_NAMES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc",
             "nnUNet_n_proc_DA")


def write_slurm_scripts(runs: Sequence[FoldRun], common: Sequence[str], script_dir: str | os.PathLike,
                        sbatch_options: Sequence[str], train_args: Sequence[str] = (),
                        best_args: Sequence[str] | None = None) -> tuple[Path, Path | None]:
    """Write the array script (one task per run) and, if `best_args` is given, the find-best script.

    `common` are the `moe_nnunet cv` arguments both jobs share (-d, -tr, -p, -device); `best_args` are the
    find-best job's own (-c, --folds, --with). `sbatch_options` become `#SBATCH` lines of both scripts
    (e.g. `--partition=gpu`, `--gres=gpu:1`)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    script_dir = Path(script_dir).resolve()
    log_dir = script_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    job_name = f"cv_{maybe_convert_to_dataset_name(runs[0].dataset)}_{runs[0].trainer}"
    fields = dict(job_name=job_name, log_dir=log_dir, moe_nnunet=shlex.quote(str(BIN / "moe_nnunet")),
                  resources="\n".join(f"#SBATCH {opt}" for opt in sbatch_options),
                  env="\n".join(f"export {k}={shlex.quote(os.environ[k])}" for k in ENV_NAMES if k in os.environ))
    extra = f" --train_args {shlex.join(train_args)}" if train_args else ""
    array = script_dir / f"{job_name}.sbatch"
    array.write_text(SLURM_ARRAY.format(**fields, last=len(runs) - 1, common=shlex.join(common),
                                        configurations=" ".join(r.configuration for r in runs),
                                        folds=" ".join(r.fold for r in runs), train_args=extra))
    best = None
    if best_args is not None:
        best = script_dir / f"{job_name}_best.sbatch"
        best.write_text(SLURM_BEST.format(**fields, common=shlex.join([*common, *best_args])))
    return array, best


def submit_slurm(array: Path, best: Path | None, test_only: bool = False) -> list[str]:
    """`sbatch` the array, then the find-best script after it (`afterok`); returns the job ids (with
    `test_only`, sbatch's `--test-only` verdicts, nothing submitted)."""
    def sbatch(*args: str) -> str:
        proc = subprocess.run(["sbatch", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return (proc.stdout + proc.stderr).strip()

    if test_only:
        return [sbatch("--test-only", str(array))] + ([sbatch("--test-only", str(best))] if best else [])
    ids = [sbatch("--parsable", str(array)).split(";")[0]]
    if best is not None:
        ids.append(sbatch("--parsable", f"--dependency=afterok:{ids[0]}", str(best)).split(";")[0])
    return ids
