"""Measure our M4oE network against nnU-Net's own network on the same input, in one process.

Both networks are built from plans kwargs through nnU-Net's `get_network_from_plans`, get the same input,
the same nnU-Net loss (deep-supervision Dice + cross-entropy) and nnU-Net's SGD, and are timed in
alternation (ours, baseline, ours, baseline, ...) so that a noisy machine slows both alike. Reference
networks (`moe_nnunet.profiling.references`: nnU-Net's ResEnc M, MONAI's SwinUNETR) join the alternation when
asked for with `add_references`.

Two ways to describe what to measure (`moe_nnunet.profiling.setups`):

- `plans_setup(dataset, configuration, ...)`: a preprocessed dataset's plans (ours, default
  nnUNetM4oEPlans) against nnU-Net's plans for the same configuration (default nnUNetPlans);
- `synthetic_setup(channels, patch_size, ...)`: no dataset; both networks use nnU-Net's default
  topology for the patch (the GPU reference runs use this).

`run_benchmark(setup, ...)` returns a JSON-serialisable dict; `format_report(result)`
(`moe_nnunet.profiling.printing`) renders it.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Sequence

import torch

from moe_nnunet.profiling.memory import (GIB, NNUNET_REFERENCE, fake_network, planner_units_to_gib,
                                         simulate_training_memory, training_memory_in_planner_units)
from moe_nnunet.profiling.runner import Runner
from moe_nnunet.profiling.setups import first_line
from moe_nnunet.profiling.spec import BenchmarkSetup, NetworkSpec

__all__ = ["run_benchmark"]

MIB = 2 ** 20


def _check_patch(spec: NetworkSpec, patch: Sequence[int]) -> None:
    strides = spec.arch_kwargs.get("strides")
    if strides is None:  # a reference without nnU-Net's stages checks its patch itself (add_references)
        return
    if len(strides[0]) != len(patch):
        raise ValueError(f"the {spec.name} network is {len(strides[0])}D but patch_size {list(patch)} has "
                         f"{len(patch)} axes.")
    divisor = [math.prod(s[a] for s in strides) for a in range(len(patch))]
    if any(p % d for p, d in zip(patch, divisor)):
        raise ValueError(f"patch_size {list(patch)} is not divisible by {divisor}, the total downsampling of the "
                         f"{spec.name} network ({spec.origin}); choose a patch_size that is.")


def _peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, which a new program starts from zero; getrusage's ru_maxrss would carry over the peak of
    the process that started it. Elsewhere: ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


# imported before a probe reads its starting peak, so that import memory does not count as the network's
_PROBE_IMPORTS = ("nnunetv2.utilities.get_network_from_plans", "nnunetv2.training.loss.compound_losses",
                  "nnunetv2.training.loss.deep_supervision", "nnunetv2.training.loss.dice")


def _cpu_memory_probe(spec: NetworkSpec, patch: list[int], batch_size: int, batch_dice: bool, bf16: bool,
                      threads: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth (MiB) over building the network and one forward
    ("inference"), then over one training step as well ("train")."""
    import importlib
    for module in _PROBE_IMPORTS + (spec.class_name.rsplit(".", 1)[0],):
        importlib.import_module(module)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    before = _peak_rss_bytes()
    runner = Runner(spec, patch, batch_size, batch_dice, torch.device("cpu"), bf16)
    runner.inference()
    after_inference = _peak_rss_bytes()
    runner.train_step()
    after_train = _peak_rss_bytes()
    return {"inference": (after_inference - before) / MIB, "train": (after_train - before) / MIB}


def _cpu_memory(setup: BenchmarkSetup, bf16: bool) -> dict[str, dict[str, float]]:
    """Peak CPU memory of each network, each in a freshly started process of its own (a peak cannot be
    taken back, so in one process the larger network would hide the smaller). "spawn" starts a new
    program, whose peak starts from zero; a forked process would inherit its parent's."""
    specs = setup.networks
    args = [(spec, setup.patch_size, setup.batch_size, setup.batch_dice, bf16, torch.get_num_threads())
            for spec in specs]
    with multiprocessing.get_context("spawn").Pool(len(specs), maxtasksperchild=1) as pool:
        return {spec.name: mem for spec, mem in zip(specs, pool.starmap(_cpu_memory_probe, args))}


def _simulated_memory(spec: NetworkSpec, setup: BenchmarkSetup, bf16: bool) -> dict[str, Any]:
    """`simulate_training_memory` of the benchmark's step (nnU-Net's SGD), or why it could not be made."""
    try:
        estimate = simulate_training_memory(spec, setup.patch_size, setup.batch_size, bf16=bf16,
                                            batch_dice=setup.batch_dice, optimizer="sgd", depth=2)
    except Exception as error:  # noqa: BLE001 - reported, the other figures still stand
        return {"simulated_train_memory_error": f"{type(error).__name__}: {first_line(error)}"}
    return {"simulated_train_memory_mib": estimate.peak_bytes / MIB,
            "simulated_train_memory_by_part_mib": {k: v / MIB for k, v in estimate.by_part.items()}}


def _curriculum_phases(spec: NetworkSpec, setup: BenchmarkSetup, bf16: bool) -> dict[str, Any]:
    """Our trainer's step (AdamW) simulated in both phases of its expert curriculum: during it (the first
    `curriculum_epochs`: the expert heads and their losses live) and after it. The baseline has no curriculum."""
    phases = {}
    for key, curriculum in (("simulated_train_memory_curriculum_mib", True),
                            ("simulated_train_memory_after_curriculum_mib", False)):
        try:
            estimate = simulate_training_memory(spec, setup.patch_size, setup.batch_size, bf16=bf16,
                                                batch_dice=setup.batch_dice, optimizer="adamw", curriculum=curriculum)
        except Exception as error:  # noqa: BLE001 - reported, the other figures still stand
            return {"simulated_train_memory_phases_error": f"{type(error).__name__}: {first_line(error)}"}
        phases[key] = estimate.peak_bytes / MIB
    return phases


def _ours_planner_estimate(spec: NetworkSpec, patch: Sequence[int], fallback: float) -> float:
    """What `M4oEPlanner` hands nnU-Net for this network and patch (its fallback if the simulation fails)."""
    try:
        return training_memory_in_planner_units(spec, list(patch))
    except Exception:  # noqa: BLE001 - as the planner: fall back to the feature-map count
        return fallback


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_benchmark(setup: BenchmarkSetup, device: str = "cpu", iterations: int = 10, warmup: int = 3,
                  bf16: bool = False, compile: bool = False, measure_memory: bool = True,
                  command: str | None = None, progress: Callable[[str], None] | None = None,
                  peak_tflops: float | None = None, simulate: bool = False,
                  case_size: Sequence[int] | None = None, case_repeats: int = 3,
                  mirroring: bool = True) -> dict[str, Any]:
    """Time, count and size the networks of `setup`; returns a JSON-serialisable dict.

    Args:
        setup: the two networks and their input.
        device: "cpu" or "cuda" (or "cuda:<i>").
        iterations: measured steps per network and phase (medians are reported).
        warmup: unmeasured steps before them (cuDNN autotuning, compilation, allocator warm-up).
        bf16: bfloat16 autocast for forward and loss.
        compile: `torch.compile` both networks (CUDA only, as in nnU-Net).
        measure_memory: on CPU, run one extra process per network to read its peak RSS.
        command: the command line, stored in the result.
        progress: called with a short message before each phase.
        peak_tflops: the device's peak TFLOP/s for the precision used; with it, model FLOP utilisation
            (training-step FLOPs / median step time / peak) is reported.
        simulate: nothing is timed or allocated: parameters, FLOPs, the simulated training memory (for ours also
            our trainer's step during and after its expert curriculum) and the planner's estimate, all on fake tensors (`moe_nnunet.profiling.memory`), in seconds even at 128³ on a
            CPU. `device`, `iterations`, `warmup`, `compile`, `measure_memory` and `peak_tflops` are unused.
        case_size: also time nnU-Net's sliding-window prediction of a whole case of this size (random
            values, the networks' channels) with each network, `case_repeats` times after one warm-up
            (when `warmup` > 0), with test-time `mirroring` as nnU-Net's default.
    """
    if simulate:
        if compile:
            raise ValueError("--compile measures compiled kernels on a GPU; --simulate times nothing: give one.")
        return _simulated_benchmark(setup, bf16, command, progress)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu or cuda.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA GPU; use --device cpu.")
    if compile and dev.type != "cuda":
        raise ValueError("--compile needs --device cuda (nnU-Net does not compile on CPU either).")
    if iterations < 1 or warmup < 0:
        raise ValueError(f"iterations={iterations} must be >= 1 and warmup={warmup} >= 0.")
    if case_size is not None and (len(case_size) != len(setup.patch_size) or min(case_size) < 1
                                  or case_repeats < 1):
        raise ValueError(f"case_size {list(case_size)} needs {len(setup.patch_size)} positive sizes, like the "
                         f"patch {setup.patch_size}, and case_repeats={case_repeats} must be >= 1.")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak_tflops={peak_tflops} must be positive (e.g. the bf16 dense peak of the GPU).")
    for spec in setup.networks:
        _check_patch(spec, setup.patch_size)
    began = time.perf_counter()

    def say(message: str) -> None:
        if progress is not None:
            progress(f"{time.perf_counter() - began:7.1f} s  {message}")

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's training entry point does

    say("building networks")
    runners = [Runner(spec, setup.patch_size, setup.batch_size, setup.batch_dice, dev, bf16)
               for spec in setup.networks]
    networks = {r.spec.name: r.describe(setup.patch_size) for r in runners}
    say("counting FLOPs: one extra training step and forward per network")
    for r in runners:
        networks[r.spec.name].update(r.count_flops())
    say("simulating each network's training-step memory on fake tensors")
    _add_simulated_memory(networks, setup, bf16)

    memory_method = "torch.cuda.max_memory_allocated during the step + parameters, buffers, optimizer state, " \
                    "input and targets"
    if dev.type == "cpu":
        memory_method = "approximate: growth of the peak resident set size of a fresh process over building " \
                        "the network and one forward / then also one training step"
        if measure_memory:
            say("measuring CPU memory: a fresh process per network, both at once")
            for name, mem in _cpu_memory(setup, bf16).items():
                networks[name].update(train_memory_mib=mem["train"], inference_memory_mib=mem["inference"])

    if compile:
        for r in runners:
            r.model = torch.compile(r.net)
    for phase, step in (("train", Runner.train_step), ("inference", Runner.inference)):
        say(f"timing {phase}: {warmup} warm-up + {iterations} measured steps per network, alternating")
        for i in range(warmup + iterations):
            for r in runners:
                ms = step(r)
                if i >= warmup:
                    r.times[phase].append(ms)

    if case_size is not None:
        case = torch.randn(setup.ours.input_channels, *case_size)  # on the host, as nnU-Net's preprocessed data
        say(f"timing nnU-Net's sliding-window prediction of a {'x'.join(map(str, case_size))} case"
            f"{' with mirroring' if mirroring else ''}: {int(warmup > 0)} warm-up + {case_repeats} per network")
        for i in range(int(warmup > 0) + case_repeats):
            for r in runners:
                ms = r.sliding_window(case, mirroring)
                if i >= int(warmup > 0):
                    r.times["sliding_window"].append(ms)

    for r in runners:
        record = networks[r.spec.name]
        for phase in ("train", "inference", "sliding_window"):
            if not r.times[phase]:
                continue
            record[f"{phase}_ms"] = statistics.median(r.times[phase])
            record[f"{phase}_ms_all"] = [round(t, 3) for t in r.times[phase]]
            if phase == "sliding_window":
                if dev.type == "cuda":
                    record["sliding_window_memory_mib"] = (r.peak_extra[phase] + r.static_bytes(False)) / MIB
                continue
            if dev.type == "cuda":
                record[f"{phase}_memory_mib"] = (r.peak_extra[phase] + r.static_bytes(phase == "train")) / MIB
            if peak_tflops is not None:  # FLOP/s achieved over the median step, as a share of the peak
                achieved = record[f"{phase}_flops"] / (record[f"{phase}_ms"] * 1e-3)
                record[f"{phase}_mfu"] = achieved / (peak_tflops * 1e12)
        if dev.type == "cuda":  # how far the simulation and the planner are from the measured peak
            for key in ("simulated_train_memory_mib", "planner_memory_mib"):
                record[f"{key}_over_measured"] = _ratio(record.get(key), record.get("train_memory_mib"))
    return _result(setup, networks, command, memory_method,
                   {"type": dev.type, "name": _device_name(dev), "load_average_before": load_before,
                    "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
                   {"iterations": iterations, "warmup": warmup, "bf16": bf16, "compile": compile,
                    "peak_tflops": peak_tflops, "simulate": False,
                    "case_size": None if case_size is None else list(case_size),
                    "case_repeats": case_repeats if case_size is not None else None, "mirroring": mirroring})


def _add_simulated_memory(networks: dict[str, dict[str, Any]], setup: BenchmarkSetup, bf16: bool) -> None:
    """Each network's simulated training-step memory; ours gets the planner's estimate our planner makes,
    and every network the GPU memory nnU-Net's planner budgets for its estimate."""
    ndim = len(setup.patch_size)
    for spec in setup.networks:
        record = networks[spec.name]
        record.update(_simulated_memory(spec, setup, bf16))
        if spec.name == "ours" and record.get("planner_estimate") is not None:
            record["planner_estimate"] = _ours_planner_estimate(spec, setup.patch_size, record["planner_estimate"])
        if record.get("planner_estimate") is not None and ndim in NNUNET_REFERENCE:
            record["planner_memory_mib"] = planner_units_to_gib(record["planner_estimate"], ndim,
                                                                setup.batch_size) * GIB / MIB


def _simulated_benchmark(setup: BenchmarkSetup, bf16: bool, command: str | None,
                         progress: Callable[[str], None] | None) -> dict[str, Any]:
    """`run_benchmark(..., simulate=True)`: parameters, FLOPs and memory of every network on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for spec in setup.networks:
        _check_patch(spec, setup.patch_size)
    began = time.perf_counter()
    networks = {}
    for spec in setup.networks:
        if progress is not None:
            progress(f"{time.perf_counter() - began:7.1f} s  {spec.name}: parameters and FLOPs on fake tensors")
        mode = FakeTensorMode()
        net = fake_network(spec, mode)
        with mode:
            runner = Runner(spec, setup.patch_size, setup.batch_size, setup.batch_dice, torch.device("cpu"),
                            bf16, net=net)
            networks[spec.name] = {**runner.describe(setup.patch_size), **runner.count_flops()}
    if progress is not None:
        progress(f"{time.perf_counter() - began:7.1f} s  simulating each network's training-step memory")
    _add_simulated_memory(networks, setup, bf16)
    if progress is not None:
        progress(f"{time.perf_counter() - began:7.1f} s  ours: our trainer's step during and after the expert "
                 f"curriculum")
    networks["ours"].update(_curriculum_phases(setup.ours, setup, bf16))
    return _result(setup, networks, command, "not measured: --simulate (see the simulated rows)",
                   {"type": "none", "name": "none (fake tensors)", "load_average_before": None,
                    "load_average_after": None},
                   {"iterations": 0, "warmup": 0, "bf16": bf16, "compile": False, "peak_tflops": None,
                    "simulate": True})


def _result(setup: BenchmarkSetup, networks: dict[str, dict[str, Any]], command: str | None, memory_method: str,
            device: dict[str, Any], how: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable result: the figures per network, ours / each other network, and the context."""
    ours = networks["ours"]
    keys = ("train_ms", "inference_ms", "sliding_window_ms", "sliding_window_memory_mib", "train_memory_mib",
            "inference_memory_mib", "simulated_train_memory_mib", "params", "train_flops", "inference_flops",
            "planner_estimate", "planner_memory_mib")
    # ours / each other network; "ratios" keeps ours / baseline
    ratios_to = {name: {key: _ratio(ours.get(key), other.get(key)) for key in keys if key in ours}
                 for name, other in networks.items() if name != "ours"}
    return {
        "command": command,
        "argv": list(sys.argv),
        "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "nnunetv2": _package_version("nnunetv2"),
                     "dynamic_network_architectures": _package_version("dynamic_network_architectures"),
                     "moe_nnunet": _package_version("moe_nnunet")},
        "setup": {**setup.info, "patch_size": setup.patch_size, "batch_size": setup.batch_size,
                  "channels": setup.ours.input_channels, "num_classes": setup.ours.num_classes,
                  "batch_dice": setup.batch_dice, **how},
        "memory_method": memory_method,
        "networks": networks,
        "skipped": dict(setup.skipped),
        "ratios": ratios_to["baseline"],
        "ratios_to": ratios_to,
    }
