"""A `run_benchmark` result as a readable table (`format_report`) and as JSON (`write_json`)."""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["format_report", "write_json"]


LABEL = 40  # width of the row labels
# figures of our network alone: the two phases of its trainer's expert curriculum
OURS_ONLY = ("simulated_train_memory_curriculum_mib", "simulated_train_memory_after_curriculum_mib")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """Readable table of a `run_benchmark` result: a column per network, then ours / each other network, and
    where our FLOPs go."""
    s, networks = result["setup"], result["networks"]
    ratios_to = result.get("ratios_to") or {"baseline": result["ratios"]}
    precision = ("bf16 autocast" if s["bf16"] else "fp32") + (", torch.compile" if s["compile"] else ", eager")
    if s.get("simulate"):
        precision = ("bf16 autocast" if s["bf16"] else "fp32") + "; simulated on fake tensors, nothing timed"
    rows = [
        ("training step, median ms", "train_ms", 1, 1),
        ("inference forward, median ms", "inference_ms", 1, 1),
        ("sliding window, whole case, median ms", "sliding_window_ms", 1, 1),
        ("  its peak memory, MiB", "sliding_window_memory_mib", 1, 0),
        ("training peak memory, MiB", "train_memory_mib", 1, 0),
        ("  simulated (fake tensors), MiB", "simulated_train_memory_mib", 1, 0),
        ("  simulated, curriculum phase, MiB", "simulated_train_memory_curriculum_mib", 1, 0),
        ("  simulated, after the curriculum, MiB", "simulated_train_memory_after_curriculum_mib", 1, 0),
        ("  planner's estimate, MiB", "planner_memory_mib", 1, 0),
        ("inference peak memory, MiB", "inference_memory_mib", 1, 0),
        ("parameters, M", "params", 1e-6, 2),
        ("training step, GFLOP", "train_flops", 1e-9, 1),
        ("inference forward, GFLOP", "inference_flops", 1e-9, 1),
        ("planner estimate, M nnU-Net units", "planner_estimate", 1e-6, 1),
    ]
    if s.get("peak_tflops"):
        rows += [("training model FLOP utilisation, %", "train_mfu", 100, 1),
                 ("inference model FLOP utilisation, %", "inference_mfu", 100, 1)]
    names = list(networks)
    columns = names + [f"ours/{n}" for n in ratios_to]
    width = max(12, *(len(c) + 2 for c in columns))
    lines = [f"device: {result['device']['name']}; torch {result['versions']['torch']}, "
             f"nnunetv2 {result['versions']['nnunetv2']}; {precision}"
             + (f"; peak {s['peak_tflops']:g} TFLOP/s" if s.get("peak_tflops") else ""),
             f"input: batch {s['batch_size']} x {s['channels']} channels x {'x'.join(map(str, s['patch_size']))}, "
             f"{s['num_classes']} outputs"
             + ("" if s.get("simulate") else
                f"; {s['iterations']} measured steps after {s['warmup']} warm-up, alternating")]
    if s.get("case_size"):
        lines.append(f"sliding window: one {'x'.join(map(str, s['case_size']))} case, nnUNetPredictor's defaults "
                     f"(half-tile overlap, Gaussian weights, float16 autocast on CUDA), mirroring "
                     f"{'on' if s['mirroring'] else 'off'}, {s['case_repeats']} measured per network")
    lines += [f"{n} ({networks[n]['class'].rsplit('.', 1)[-1]}): {networks[n]['origin']}" for n in names]
    lines += [f"{n}: skipped ({why})" for n, why in result.get("skipped", {}).items()]
    lines += ["", f"{'':{LABEL}}" + "".join(f"{c:>{width}}" for c in columns)]
    for label, key, scale, digits in rows:
        values = [networks[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        # a figure only our network has (its curriculum) is left blank for the others, not "n/a"
        cells = ["" if v is None and key in OURS_ONLY else _fmt(None if v is None else v * scale, digits)
                 for v in values]
        cells += [_fmt(ratios_to[n][key], 2) if key in ratios_to[n] else "" for n in ratios_to]
        lines.append(f"{label:{LABEL}}" + "".join(f"{c:>{width}}" for c in cells))
    lines += [""]
    if any(key in networks["ours"] for key in OURS_ONLY):
        lines.append("curriculum phase / after the curriculum: our trainer's step (AdamW), with the expert heads and "
                     "their losses (its first curriculum_epochs) / without them")
    if "simulated_train_memory_phases_error" in networks["ours"]:
        lines.append(f"curriculum phases not simulated: {networks['ours']['simulated_train_memory_phases_error']}")
    lines += [f"memory: {result['memory_method']}", ""]
    return "\n".join(lines + _our_parts(networks["ours"]))


def _our_parts(ours: dict[str, Any]) -> list[str]:
    """Where our network's forward FLOPs and parameters sit: experts (per stage), gates, decoder."""
    flops, params = ours.get("inference_flops_by_module", {}), ours.get("params_by_part", {})
    depths = ours["arch_kwargs"].get("swin_depths", [])
    rows = [("experts, all", flops.get("encoder.experts"), params.get("encoder.experts"))]
    for s, depth in enumerate(depths):
        kind = f"Swin, {depth} blocks" if depth else "conv"
        rows.append((f"  stage {s} ({kind})", flops.get(f"encoder.experts.stages.{s}"), None))
    gates = [v for k, v in flops.items() if k.startswith("encoder.gates.") and k.count(".") == 2]
    rows += [("gates", sum(gates) if gates else None, params.get("encoder.gates")),
             ("expert heads (curriculum only)", None, params.get("encoder.heads")),
             ("decoder", flops.get("decoder"), params.get("decoder"))]
    lines = [f"{'ours, by part':{LABEL}}{'inference GFLOP':>22}{'parameters, M':>30}"]
    for label, f, p in rows:
        if f is not None or p is not None:
            lines.append(f"{label:{LABEL}}{_fmt(None if f is None else f * 1e-9):>22}"
                         f"{_fmt(None if p is None else p * 1e-6, 2):>30}")
    return lines


def write_json(result: dict[str, Any], path: str) -> None:
    """Write a `run_benchmark` result as indented JSON (creating the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
