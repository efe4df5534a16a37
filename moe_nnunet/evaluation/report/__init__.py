"""A self-contained HTML report for a trained nnU-Net model folder (M4oE or any other trainer).

`make_report` reads `$nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>` (its fold_N folders:
nnU-Net's validation summary, the checkpoint's training log, M4oE's gate statistics) and writes
`report.html` with its PNGs and `summary.json`. Baseline model folders of the same dataset go side by side.
Sections are rendered only from what exists, so a plain nnUNetTrainer folder (no gate) works too.

`model` reads a model folder, `summary` computes the figures of summary.json and writes the report
(`make_report`), `figures` draws the PNGs, `html_page` renders report.html, `demo_page` the demo's overview page.
"""
from moe_nnunet.evaluation.report.demo_page import write_demo_overview
from moe_nnunet.evaluation.report.html_page import missing_modality_html
from moe_nnunet.evaluation.report.model import load_model
from moe_nnunet.evaluation.report.summary import make_report, versions

__all__ = ["make_report", "load_model", "missing_modality_html", "write_demo_overview", "versions"]
