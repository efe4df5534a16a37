"""Gate statistics: which expert the gate trusts, per scale, per label and per modality, during training and
for each validation case.

`GateStatistics` accumulates over an epoch of training batches (on the device, synchronised once per epoch);
`plot_gate_history` draws the epochs into `gate_weights.png` beside nnU-Net's `progress.png`;
`ValidationGateRecorder` records the mean gate weights of every validation case into a JSON file.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["GateStatistics", "plot_gate_history", "ValidationGateRecorder"]


class GateStatistics:
    """Running means of gate weights over training batches.

    Args:
        expert_names: E names.
        label_names: label value -> name for the per-label means (None: no per-label statistics).
        modality_names: case modality tags (datasets combined across modalities) for per-modality means.
    """

    def __init__(self, expert_names: Sequence[str], label_names: dict[int, str] | None = None,
                 modality_names: Sequence[str] | None = None) -> None:
        self.expert_names = list(expert_names)
        self.label_names = dict(sorted(label_names.items())) if label_names else {}
        self.modality_names = list(modality_names) if modality_names else []
        self.reset()

    def reset(self) -> None:
        self._scale_sum: torch.Tensor | None = None      # (n_scales, E)
        self._batches = 0
        self._label_sum: torch.Tensor | None = None      # (L, E) summed weights of the voxels of each label
        self._label_count: torch.Tensor | None = None    # (L,)
        self._modality_sum: torch.Tensor | None = None   # (M, E) summed per-sample means
        self._modality_count: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, scale_means: Sequence[torch.Tensor], full_res_weights: torch.Tensor | None = None,
               target: torch.Tensor | None = None, sample_modality: torch.Tensor | None = None) -> None:
        """Add one batch.

        Args:
            scale_means: per scale, the (E,) mean gate weight of the batch.
            full_res_weights: (B, E, *S) gate weights at full resolution.
            target: (B, 1, *S) integer label map of the batch (same grid as `full_res_weights`).
            sample_modality: (B,) index into `modality_names` per sample.
        """
        means = torch.stack([m.float() for m in scale_means])
        self._scale_sum = means if self._scale_sum is None else self._scale_sum + means
        self._batches += 1
        if full_res_weights is None:
            return
        num_experts = full_res_weights.shape[1]
        flat = full_res_weights.float().movedim(1, -1).reshape(-1, num_experts)  # (B*T, E)
        if target is not None and self.label_names:
            n_labels = max(self.label_names) + 1
            labels = target.to(flat.device).long().reshape(-1)
            valid = (labels >= 0) & (labels < n_labels)
            labels, rows = labels[valid], flat[valid]
            sums = torch.zeros(n_labels, num_experts, device=flat.device).index_add_(0, labels, rows)
            counts = torch.bincount(labels, minlength=n_labels).float()
            self._label_sum = sums if self._label_sum is None else self._label_sum + sums
            self._label_count = counts if self._label_count is None else self._label_count + counts
        if sample_modality is not None and self.modality_names:
            per_sample = full_res_weights.float().flatten(2).mean(-1)  # (B, E)
            idx = sample_modality.to(per_sample.device).long()
            sums = torch.zeros(len(self.modality_names), num_experts, device=per_sample.device)
            sums.index_add_(0, idx, per_sample)
            counts = torch.bincount(idx, minlength=len(self.modality_names)).float()
            self._modality_sum = sums if self._modality_sum is None else self._modality_sum + sums
            self._modality_count = counts if self._modality_count is None else self._modality_count + counts

    def summary(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict:
        """Means since `reset` as a JSON-serialisable dict; `all_reduce` (summing in place) combines the sums of
        several processes (DDP) before dividing."""
        def reduced(t):
            if t is None:
                return None
            t = t.clone()
            if all_reduce is not None:
                all_reduce(t)
            return t.cpu().double().numpy()

        def rounded(a):
            return np.round(a, 4).tolist()

        out: dict = {"experts": self.expert_names}
        scale_sum = reduced(self._scale_sum)
        # on the statistics' device: NCCL reduces CUDA tensors only
        device = self._scale_sum.device if self._scale_sum is not None else None
        batches = reduced(torch.tensor(float(self._batches), device=device))
        if scale_sum is not None and batches > 0:
            per_scale = scale_sum / batches
            out["per_scale"] = rounded(per_scale)
            out["mean"] = rounded(per_scale.mean(0))
        label_sum, label_count = reduced(self._label_sum), reduced(self._label_count)
        if label_sum is not None:
            out["per_label"] = {name: rounded(label_sum[v] / label_count[v]) for v, name in self.label_names.items()
                                if v < len(label_count) and label_count[v] > 0}
        mod_sum, mod_count = reduced(self._modality_sum), reduced(self._modality_count)
        if mod_sum is not None:
            out["per_modality"] = {name: rounded(mod_sum[i] / mod_count[i])
                                   for i, name in enumerate(self.modality_names) if mod_count[i] > 0}
        return out


def plot_gate_history(history: Sequence[dict | None], path: str | os.PathLike) -> None:
    """Draw per-epoch gate summaries (`GateStatistics.summary` dicts) into one PNG.

    Left: mean gate weight of each expert over the epochs (solid: averaged over scales; dotted: full
    resolution). Right: the last epoch's weights per label (and per case modality), as stacked bars.
    """
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    epochs = [(i, h) for i, h in enumerate(history) if h and "mean" in h]
    if not epochs:
        return
    with plt.style.context("default"):  # independent of the seaborn style nnU-Net's progress plot sets
        _draw_gate_history(plt, epochs, path)


def _draw_gate_history(plt, epochs: list[tuple[int, dict]], path) -> None:
    from matplotlib.ticker import MaxNLocator
    last = epochs[-1][1]
    names = last["experts"]
    groups = {**{f"label: {k}": v for k, v in last.get("per_label", {}).items()},
              **{f"{k} cases": v for k, v in last.get("per_modality", {}).items()}}
    fig, axes = plt.subplots(1, 2 if groups else 1, figsize=(13 if groups else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = [i for i, _ in epochs]
    for e, name in enumerate(names):
        c = colors[e % len(colors)]
        ax.plot(x, [h["mean"][e] for _, h in epochs], color=c, lw=2.5, label=f"{name} (all scales)")
        ax.plot(x, [h["per_scale"][0][e] for _, h in epochs], color=c, lw=1.5, ls=":",
                label=f"{name} (full resolution)")
    ax.axhline(1 / len(names), color="grey", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="mean gate weight", ylim=(0, 1), title="Gate weight per expert (training)")
    ax.legend(fontsize=8)
    if groups:
        ax = axes[0, 1]
        rows = list(groups)
        left = np.zeros(len(rows))
        for e, name in enumerate(names):
            vals = np.array([groups[r][e] for r in rows])
            ax.barh(rows, vals, left=left, color=colors[e % len(colors)], label=name)
            left += vals
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="gate weight at full resolution",
               title=f"Which expert the gate trusts (epoch {epochs[-1][0]})")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ValidationGateRecorder:
    """Records each validation case's mean gate weights (per scale, averaged over its sliding-window patches).

    nnU-Net's validation loads one case, then runs the sliding window on it; `wrap_dataset_class` returns a
    subclass of the trainer's dataset class whose `load_case` tells the recorder which case comes next, and a
    forward hook on the network reads the gates after every patch.

    Args:
        network: the network nnU-Net calls (possibly wrapped by DDP / torch.compile).
        moe_network: the M4oE network itself; it keeps the mean gate weights of each eval forward while
            recording (`record_gate_means`).
        expert_names: E names.
    """

    def __init__(self, network: nn.Module, moe_network: nn.Module, expert_names: Sequence[str]) -> None:
        self.moe_network = moe_network
        moe_network.record_gate_means = True
        self.expert_names = list(expert_names)
        self.cases: dict[str, dict] = {}
        self._current: str | None = None
        self._sums: torch.Tensor | None = None
        self._patches = 0
        self._handle = network.register_forward_hook(self._after_forward)

    def _after_forward(self, module, args, output) -> None:
        if self._current is None:
            return
        means = self.moe_network.last_gate_means.float()
        self._sums = means if self._sums is None else self._sums + means
        self._patches += 1

    def _finish_case(self) -> None:
        if self._current is not None and self._patches:
            per_scale = (self._sums / self._patches).cpu().double().numpy()
            self.cases[self._current] = {"mean": np.round(per_scale.mean(0), 4).tolist(),
                                         "per_scale": np.round(per_scale, 4).tolist(),
                                         "patches": self._patches}
        self._current, self._sums, self._patches = None, None, 0

    def start_case(self, key: str) -> None:
        self._finish_case()
        self._current = key

    def wrap_dataset_class(self, dataset_class: type) -> type:
        recorder = self

        class RecordingDataset(dataset_class):
            def load_case(self, identifier):
                recorder.start_case(identifier)
                return super().load_case(identifier)

        RecordingDataset.__name__ = dataset_class.__name__
        return RecordingDataset

    def close(self) -> None:
        self._finish_case()
        self._handle.remove()
        self.moe_network.record_gate_means = False
        self.moe_network.last_gate_means = None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"experts": self.expert_names,
                       "description": "mean gate weight per expert for each validation case, averaged over the "
                                      "sliding-window patches; per_scale is highest resolution first",
                       "cases": self.cases}, f, indent=1)
