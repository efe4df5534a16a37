"""Validation curves of trained models and the plateau rule: the per-epoch validation pseudo-Dice that nnU-Net
logs in each checkpoint (`read_curves`), a plot of several models' curves (`plot_curves`) and whether a curve has
levelled off (`plateau_verdict`, in words `verdict_words`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["PLATEAU_RULE", "plateau_verdict", "verdict_words", "read_curves", "plot_curves"]

PLATEAU_FRACTION, PLATEAU_TOLERANCE = 0.25, 0.01
PLATEAU_RULE = ("plateaued when the mean validation pseudo-Dice of the last 25 % of the epochs is less than 1 point "
                "above the mean of the 25 % before")


def plateau_verdict(dice: Sequence[float], fraction: float = PLATEAU_FRACTION,
                    tolerance: float = PLATEAU_TOLERANCE) -> dict:
    """Whether a per-epoch validation Dice curve has plateaued: the mean of the last `fraction` of the epochs
    exceeds the mean of the `fraction` before it by less than `tolerance`. Means of windows, not the last
    values, so that the noise of a few validation batches does not decide; nnU-Net's EMA would lag instead.

    Returns {"plateaued": bool or None (fewer than 8 epochs: too short to tell), "rise", "last_quarter",
    "previous_quarter", "rule"}.
    """
    values = [float(v) for v in dice]
    n = max(2, round(len(values) * fraction))
    if len(values) < 8:
        return {"plateaued": None, "rise": None, "last_quarter": None, "previous_quarter": None,
                "rule": f"{PLATEAU_RULE}; {len(values)} epochs are too few to tell"}
    last = sum(values[-n:]) / n
    previous = sum(values[-2 * n:-n]) / n
    rise = last - previous
    return {"plateaued": rise < tolerance, "rise": round(rise, 4), "last_quarter": round(last, 4),
            "previous_quarter": round(previous, 4), "rule": PLATEAU_RULE}


def verdict_words(verdict: dict) -> str:
    """"plateaued", "still rising" or "too short to tell", for a `plateau_verdict`."""
    return {True: "plateaued", False: "still rising", None: "too short to tell"}[verdict["plateaued"]]


def read_curves(fold_folder: Path) -> dict | None:
    """Per-epoch validation pseudo-Dice (mean and per class), its EMA and epoch wall times, from nnU-Net's log in
    checkpoint_final.pth (else checkpoint_latest.pth); None before the first checkpoint."""
    from moe_nnunet.trainers.checkpointing import load_checkpoint_file

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold_folder / name).is_file():
            log = load_checkpoint_file(fold_folder / name, map_location="cpu")["logging"]
            break
    else:
        return None
    n = len(log["epoch_end_timestamps"])
    seconds = [float(e - s) for s, e in zip(log["epoch_start_timestamps"][:n], log["epoch_end_timestamps"])]
    return {"mean_fg_dice": [float(v) for v in log["mean_fg_dice"][:n]],
            "ema_fg_dice": [float(v) for v in log["ema_fg_dice"][:n]],
            "dice_per_class": [[float(x) for x in v] for v in log["dice_per_class_or_region"][:n]],
            "epoch_seconds": [round(s, 3) for s in seconds]}


def plot_curves(curves: dict[str, dict], epoch_iterations: int, title: str, output: Path) -> Path:
    """One PNG: each model's validation pseudo-Dice per epoch over training iterations (the values the plateau
    rule reads; nnU-Net's EMA of them lags by many epochs on a short budget and is left out), and the wall time
    of each epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, (model, c) in enumerate(curves.items()):
        colour = f"C{i}"
        x = [(e + 1) * epoch_iterations for e in range(len(c["mean_fg_dice"]))]
        left.plot(x, c["mean_fg_dice"], color=colour, lw=1.8, marker="." if len(x) < 60 else None, label=model)
        right.plot(range(1, len(c["epoch_seconds"]) + 1), c["epoch_seconds"], color=colour, lw=1.5, label=model)
    left.set(xlabel="training iterations", ylabel="validation pseudo-Dice (foreground mean)", ylim=(0, 1),
             title="validation pseudo-Dice per epoch")
    right.set(xlabel="epoch", ylabel="seconds", title=f"wall time per epoch ({epoch_iterations} iterations + "
                                                      f"validation)")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
