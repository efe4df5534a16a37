"""Eval forward time with one of four experts absent: skipped (the narrowed encoder) vs masked (all computed).

The planner's network for a 2d 80x80 patch, batch 12, four channels (`moe_nnunet.profiling.synthetic_setup`),
under `torch.inference_mode` as nnU-Net's predictor runs it; the two ways alternate so that load on the machine
affects both alike. Prints the median and the spread of each, and the full network with every expert present.

    python scripts/time_skipped_experts.py [--repeats 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_nnunet.profiling import synthetic_setup


def _time(net: torch.nn.Module, x: torch.Tensor, present: torch.Tensor | None, skip: bool) -> float:
    net.skip_absent_experts = skip
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), net.experts_present(present):
        net(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    setup = synthetic_setup(4, [80, 80], 12)
    net = setup.ours.build().to(args.device).eval()
    x = torch.randn(setup.batch_size, 4, *setup.patch_size, device=args.device)
    present = torch.tensor([True, True, False, True], device=args.device)
    ways = {"skipped (3 experts run)": (present, True), "masked (4 experts run)": (present, False),
            "all present": (None, True)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(2):  # warm-up; builds and caches the narrowed encoder
        for name, (mask, skip) in ways.items():
            _time(net, x, mask, skip)
    for _ in range(args.repeats):
        for name, (mask, skip) in ways.items():
            times[name].append(_time(net, x, mask, skip))
    print(f"eval forward, batch {setup.batch_size} x 4 x {setup.patch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating runs (median [min, max], ms):")
    for name, values in times.items():
        print(f"  {name:24s} {1e3 * statistics.median(values):8.1f}  [{1e3 * min(values):.1f}, "
              f"{1e3 * max(values):.1f}]")
    skipped, masked = (statistics.median(times[n]) for n in list(ways)[:2])
    print(f"  skipped / masked: {skipped / masked:.2f}")


if __name__ == "__main__":
    main()
