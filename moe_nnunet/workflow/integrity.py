"""Checks of image files before nnU-Net reads them, for `moe_nnunet predict` and `moe_nnunet plan`.

nnU-Net's readers accept some broken inputs without a word: SimpleITK reads a truncated .nii.gz as an image that
is mostly zeros, and its NIfTI reader turns NaN and inf into 0. A channel on another grid fails only once the case
is read, in a worker, after other cases may have been written. Here every file is checked first:

* a gzip file decompresses to its end (the stream is read with Python's gzip module, which checks the end marker
  and the CRC);
* the file reads as an image with the model's (or dataset's) nnU-Net reader;
* its values are finite (NIfTI values are read with nibabel, which keeps NaN and inf as they are stored);
* every channel of a case has the same shape, spacing, origin and direction as the case's first channel, compared
  with `np.allclose` as nnU-Net's readers and `verify_dataset_integrity` compare them.

Each problem names the file and the fix. With many cases the files are checked in a small process pool.
`verify_raw_dataset` adds, for a training dataset, the layout (one file per channel and a label per case), the
label values dataset.json declares (as nnU-Net's check, with the file named in the error) and then nnU-Net's own
`verify_dataset_integrity`.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["BadInputError", "FileCheck", "gzip_problem", "check_file", "check_cases", "group_channel_files",
           "extra_channel_problem", "raise_problems", "NONFINITE_FIX", "PARALLEL_FROM_CASES",
           "DatasetIntegrityError", "verify_raw_dataset"]

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 22
PARALLEL_FROM_CASES = 8  # fewer cases are checked in this process: starting workers would cost more
NONFINITE_FIX = ("replace them in the image with values that make sense for it (nnU-Net's readers do not check: "
                 "SimpleITK reads them in NIfTI files as 0), or, for moe_nnunet predict, pass --allow_nonfinite "
                 "to set them to 0")
GRID_FIX = "resample it onto that file's grid (e.g. SimpleITK.Resample(image, reference)) or give the right file"


class BadInputError(ValueError):
    """Input files that cannot be used as they are (each problem names the file and the fix)."""


@dataclass
class FileCheck:
    """What one image file turned out to be: `problem` (None if it reads), its geometry and non-finite voxels."""
    path: str
    problem: str | None = None
    geometry: dict[str, tuple] = field(default_factory=dict)
    nonfinite: int = 0


def gzip_problem(path: str | os.PathLike) -> str | None:
    """Why a gzip-compressed file (by its first bytes) does not decompress to its end; None if it does or if the
    file is not gzip-compressed (the image reader then judges it)."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes); copy or write it again"
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return None
    try:
        with gzip.open(path, "rb") as g:
            while g.read(_CHUNK):
                pass
    except EOFError:
        return (f"is truncated: its gzip stream ends after {size} bytes without gzip's end-of-stream marker (an "
                f"interrupted copy or download; nnU-Net's SimpleITK reader would read it as zeros). Copy or write "
                f"it again")
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        return f"is a corrupted gzip file ({e}); copy or write it again"
    return None


def _nonfinite(path: str, data: np.ndarray) -> int:
    """Voxels that are NaN or inf as stored (SimpleITK's NIfTI reader hides them as 0, so NIfTI is read with
    nibabel)."""
    if path.endswith((".nii", ".nii.gz")):
        import nibabel
        data = np.asanyarray(nibabel.load(path).dataobj)
    if data.dtype.kind not in "fc":
        return 0
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def _first_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(24)


def check_file(path: str, reader_class: type, values: bool = True,
               declared: Sequence[int] | None = None) -> FileCheck:
    """Check one file: gzip integrity, that `reader_class` (an nnU-Net reader) reads it, with `values` its
    non-finite voxels, and for a label file the values beyond those `declared` in dataset.json."""
    problem = gzip_problem(path)
    if problem:
        return FileCheck(path, problem)
    try:
        data, properties = reader_class().read_images([path])
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's problem, reported with the reader's words
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        gz = "; it is not gzip-compressed although named .gz" if path.endswith(".gz") else ""
        return FileCheck(path, f"cannot be read as an image by nnU-Net's {reader_class.__name__} ({reason}); it "
                               f"starts with {_first_bytes(path)!r}{gz}. Replace it with the image file it should "
                               f"be")
    geometry = {"shape": tuple(data.shape[1:]), "spacing": tuple(properties["spacing"])}
    if "sitk_stuff" in properties:
        geometry.update(origin=tuple(properties["sitk_stuff"]["origin"]),
                        direction=tuple(properties["sitk_stuff"]["direction"]))
    elif "nibabel_stuff" in properties:
        geometry["affine"] = tuple(np.asarray(properties["nibabel_stuff"]["original_affine"]).ravel())
    problem = None
    if declared is not None:
        undeclared = [int(v) if float(v).is_integer() else v for v in sorted(set(np.unique(data).tolist()) -
                                                                             set(declared))]
        if undeclared:
            problem = (f"holds label value(s) {undeclared} that dataset.json's 'labels' does not "
                       f"declare (declared: {', '.join(map(str, declared))}); correct the label file or declare the "
                       f"label in dataset.json")
    return FileCheck(path, problem, geometry, _nonfinite(path, data) if values else 0)


def _rounded(values: tuple) -> tuple:
    return tuple(v if isinstance(v, (int, np.integer)) else round(float(v), 4) for v in values)


def _grid_problem(reference: FileCheck, other: FileCheck) -> str | None:
    differ = [k for k in reference.geometry
              if k not in other.geometry or len(other.geometry[k]) != len(reference.geometry[k])
              or not np.allclose(other.geometry[k], reference.geometry[k])]
    if not differ:
        return None
    what = ", ".join(f"{k} {_rounded(other.geometry.get(k, ()))} instead of {_rounded(reference.geometry[k])}"
                     for k in differ)
    return (f"is not on the grid of {os.path.basename(reference.path)}, the case's first channel ({what}); every "
            f"channel of a case must have the same shape, spacing, origin and direction: {GRID_FIX}")


def check_cases(cases: Sequence[Sequence[str]], reader_class: type, num_processes: int = 0,
                allow_nonfinite: bool = False, declared: Sequence[int] | None = None
                ) -> tuple[dict[str, FileCheck], list[str]]:
    """Check every file of `cases` (one list of channel files per case) and each case's grid; `declared`: the
    label values allowed in every file (for label files).

    Returns the checks by path and the problems (`"<file> <problem and fix>"`, empty when all is well). With
    `num_processes` > 1 and at least `PARALLEL_FROM_CASES` cases, the files are read in that many processes.
    """
    files = list(dict.fromkeys(f for case in cases for f in case))
    args = ([reader_class] * len(files), [True] * len(files), [declared] * len(files))
    if num_processes > 1 and len(cases) >= PARALLEL_FROM_CASES:
        import multiprocessing
        with ProcessPoolExecutor(min(num_processes, len(files)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(check_file, files, *args, chunksize=4))
    else:
        results = list(map(check_file, files, *args))
    checks = {c.path: c for c in results}
    problems = [f"{c.path} {c.problem}" for c in results if c.problem]
    if not allow_nonfinite:
        problems += [f"{c.path} holds {c.nonfinite} non-finite voxel(s) (NaN or inf): {NONFINITE_FIX}"
                     for c in results if c.nonfinite]
    for case in cases:
        readable = [checks[f] for f in case if checks[f].problem is None]
        problems += [f"{c.path} {p}" for c in readable[1:] if (p := _grid_problem(readable[0], c))]
    return checks, sorted(dict.fromkeys(problems))


def raise_problems(problems: Sequence[str], what: str, error: type[BadInputError] = BadInputError,
                   noun: str = "problem(s)", most: int = 20) -> None:
    """Raise `error` listing `problems` (at most `most`, then a count) under the heading `what`, if any."""
    if not problems:
        return
    shown = [f"  {p}" for p in problems[:most]]
    if len(problems) > most:
        shown.append(f"  ... and {len(problems) - most} more")
    raise error(f"{what} ({len(problems)} {noun}):\n" + "\n".join(shown))


def group_channel_files(folder: str | os.PathLike, file_ending: str) -> tuple[dict[str, dict[int, str]], list[str]]:
    """nnU-Net's channel files `CASE_XXXX<file_ending>` of `folder`, as {case: {channel: path}}, and the files with
    that ending that are not named so."""
    folder = Path(folder)
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    found: dict[str, dict[int, str]] = {}
    unnamed = []
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = str(folder / name)
        elif name.endswith(file_ending):
            unnamed.append(str(folder / name))
    return found, unnamed


def extra_channel_problem(path: str, channel: int, num_channels: int, owner: str) -> str:
    """The problem of a channel file beyond the `num_channels` channels of `owner` (a model or dataset.json)."""
    return (f"{path}: channel {channel:04d} does not exist for {owner}, which has {num_channels} channel(s) (_0000 "
            f"to _{num_channels - 1:04d}); remove or rename the file")


# ---------------------------------------------------------------------------------------- raw training datasets


class DatasetIntegrityError(BadInputError):
    """A raw nnU-Net dataset that nnU-Net should not plan (names the files and the fix)."""


def _layout_problems(folder: Path, dataset_json: dict) -> tuple[list[str], dict[str, dict[int, str]]]:
    """imagesTr/labelsTr problems of an nnU-Net dataset: files not named CASE_XXXX, a channel missing or beyond
    channel_names, a label file missing. Returns them and the cases found."""
    ending = dataset_json["file_ending"]
    channels = dataset_json["channel_names"]
    images = folder / "imagesTr"
    found, unnamed = group_channel_files(images, ending)
    problems = [f"{f} is not named CASE_XXXX{ending} (a case id, '_' and a 4-digit channel index); rename it or "
                f"move it out of imagesTr" for f in unnamed]
    if not found:
        problems.append(f"{images} holds no images named CASE_XXXX{ending}; put the training images there")
    for case, files in found.items():
        problems += [f"{images / f'{case}_{c:04d}{ending}'} is missing: case {case} has no channel {c:04d} "
                     f"({channels[str(c)]}); add the file, or remove the case (its other channels and its label)"
                     for c in range(len(channels)) if c not in files]
        problems += [extra_channel_problem(files[c], c, len(channels), f"{folder.name} (channel_names of its "
                                           f"dataset.json)") for c in sorted(files) if c >= len(channels)]
        label = folder / "labelsTr" / f"{case}{ending}"
        if not label.is_file():
            problems.append(f"{label} is missing: case {case} has images but no label; add it or remove the case")
    return problems, found


def _error_blocks(text: str, most: int = 40) -> list[str]:
    """The error messages in nnU-Net's printed output (a line starting with "Error" or naming NaN values, and the
    lines that follow it)."""
    lines, blocks, inside = text.splitlines(), [], False
    for line in lines:
        starts = line.startswith("Error") or "NaN pixel values" in line
        if starts or (inside and line.strip() and not line.lower().startswith("warning")):
            blocks.append(f"    {line.strip()}")
            inside = True
        else:
            inside = False
    return blocks[:most]


def _nnunet_verify(folder: Path, num_processes: int) -> None:
    """nnU-Net's `verify_dataset_integrity`, its printed output (its workers' too) echoed and its errors quoted
    in the DatasetIntegrityError it becomes."""
    import sys
    import tempfile

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    error = None
    with tempfile.TemporaryFile() as out:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)  # file descriptor 1: nnU-Net's worker processes print there
        try:
            verify_dataset_integrity(str(folder), max(1, num_processes))
        except (AssertionError, RuntimeError, FileNotFoundError, ValueError, KeyError) as e:
            error = e
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    sys.stdout.write(text)
    if error is not None:
        quoted = "\n".join(_error_blocks(text))
        raise DatasetIntegrityError(
            f"nnU-Net's verify_dataset_integrity refuses {folder.name}, and nothing was written: "
            f"{str(error).strip() or type(error).__name__}" + (f"\n  nnU-Net says:\n{quoted}" if quoted else "") +
            "\nFix the files or dataset.json entries it names (declare every label value in dataset.json's "
            "'labels', one grid per case), or pass --no_verify to plan without the checks.")


def verify_raw_dataset(folder: str | os.PathLike, num_processes: int = 2) -> None:
    """Check a raw nnU-Net dataset before planning: every case has one file per channel of dataset.json and a
    label; every file decompresses, reads and holds finite values; every case's channels share one grid; label
    files hold only declared values; then nnU-Net's own `verify_dataset_integrity` (the same and label grids, the
    numbers of cases and channels, consecutive labels).

    Raises:
        DatasetIntegrityError: listing every problem found by the first check that fails, with the fix.
    """
    import json

    folder = Path(folder)
    json_file = folder / "dataset.json"
    if not json_file.is_file():
        raise DatasetIntegrityError(f"{json_file} does not exist; a raw nnU-Net dataset needs one (see nnU-Net's "
                                    f"documentation/dataset_format.md)")
    dataset_json = json.loads(json_file.read_text(encoding="utf-8"))
    if "modality" in dataset_json and "channel_names" not in dataset_json:
        dataset_json["channel_names"] = dataset_json["modality"]
    layout = "dataset" not in dataset_json and (folder / "imagesTr").is_dir() and \
        {"channel_names", "file_ending"} <= set(dataset_json)
    if layout:  # the imagesTr/labelsTr layout; datasets listing their files in dataset.json go to nnU-Net directly
        problems, found = _layout_problems(folder, dataset_json)
        raise_problems(problems, f"{folder.name} is not a complete nnU-Net dataset, and nothing was written",
                       DatasetIntegrityError)
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

        from nnunetv2.utilities.label_handling.label_handling import LabelManager

        cases = [[files[c] for c in sorted(files)] for files in found.values()]
        ending = dataset_json["file_ending"]
        labels = [[str(folder / "labelsTr" / f"{case}{ending}")] for case in found]
        reader = determine_reader_writer_from_dataset_json(dataset_json, cases[0][0])
        manager = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
        declared = list(manager.all_labels) + ([manager.ignore_label] if manager.has_ignore_label else [])
        problems = check_cases(cases, reader, num_processes)[1] + \
            check_cases(labels, reader, num_processes, declared=declared)[1]
        raise_problems(problems, f"{folder.name} holds files nnU-Net would misread, and nothing was written",
                       DatasetIntegrityError)
    _nnunet_verify(folder, num_processes)
