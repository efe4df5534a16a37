"""Partial labels in nnU-Net trainers: learn from each case only the labels its dataset annotates."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from moe_nnunet.datasets.combine import annotated_label_values, read_modality_tags
from moe_nnunet.evaluation.partial_labels import rescore_folder
from moe_nnunet.training.partial_labels import marginalise_output

__all__ = ["PartialLabels"]


class PartialLabels:
    """Trainer mixin for datasets combined from datasets that annotate different labels (`moe_nnunet combine`).

    In every training and validation step the network's output for a case has the labels its dataset does not
    annotate merged into background before nnU-Net's loss and pseudo-Dice (the marginal loss,
    `moe_nnunet.training.partial_labels`); the final validation scores each case only on the labels its dataset
    annotates (`summary.json` rewritten, `summary_per_dataset.json` beside it). Prediction is nnU-Net's: the
    union label map for any case. Other datasets train exactly as without the mixin. `partial_label_loss =
    False` (a class attribute) switches the merge off: unannotated labels are then taught as background, the
    naive combination the marginal loss is compared with.
    """
    partial_label_loss: bool = True

    def initialize(self):
        super().initialize()
        self._annotated = None
        self._annotated_values = annotated_label_values(self.dataset_json)
        self._case_source = (read_modality_tags(self.dataset_json) or {}).get("case_modality", {})
        if self._annotated_values is not None and self.partial_label_loss:
            # on the outermost module (DDP, compiled), so that every output the loss and the pseudo-Dice see is it
            self.network.register_forward_hook(self._merge_hook)
            self.print_to_log_file(f"partial labels: each case learns the labels its dataset annotates "
                                   f"{self._annotated_values} (marginal loss)")

    def annotated_for(self, keys) -> torch.Tensor | None:
        """(B, K) bool: the labels each case's dataset annotates; None when every case annotates every label."""
        if not self._annotated_values:
            return None
        num_labels = self.label_manager.num_segmentation_heads
        mask = torch.zeros(len(keys), num_labels, dtype=torch.bool)
        for i, key in enumerate(keys):
            source = self._case_source.get(str(key))
            if source is None:
                raise RuntimeError(f"case {key} has no source in dataset.json's 'moe_nnunet' entry; rebuild the "
                                   f"dataset with `moe_nnunet combine` and preprocess it again.")
            mask[i, self._annotated_values[source]] = True
        return mask

    def _merge_hook(self, module, args, output):
        return None if self._annotated is None else marginalise_output(output, self._annotated)

    @contextmanager
    def _partial_labels(self, batch: dict) -> Iterator[None]:
        if self._annotated_values is not None and self.partial_label_loss:
            self._annotated = self.annotated_for(batch.get("keys", []))  # on the host: checked without a sync
        try:
            yield
        finally:
            self._annotated = None

    def train_step(self, batch: dict) -> dict:
        with self._partial_labels(batch):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._partial_labels(batch):
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self._annotated_values is None or self.local_rank != 0:
            return
        datasets = rescore_folder(Path(self.output_folder) / "validation", self.dataset_json)
        for source, result in datasets.items():
            labels = ", ".join(f"{k} {v:.4f}" for k, v in result["labels"].items())
            self.print_to_log_file(f"validation Dice of {source} ({result['num_cases']} cases) on the labels it "
                                   f"annotates: {labels}; mean {result['mean']:.4f}")
        self.print_to_log_file(f"summary.json scores each label only on the cases that annotate it; per dataset: "
                               f"{os.path.join(self.output_folder, 'validation', 'summary_per_dataset.json')}")
