"""The demo's overview page (report.html of `moe_nnunet demo`), from its summary.json: per setting the headline
(held-out Dice with the full input and with each modality removed, M4oE's gain), the budget every model got, each
model's validation curve and plateau verdict, the Dice per label, and a link to the setting's detailed report."""
from __future__ import annotations

import os
from pathlib import Path

from moe_nnunet.evaluation.curves import verdict_words
from moe_nnunet.evaluation.report.html_page import IMAGE_CHECK, STYLE, _bold_best, _e, _fmt, missing_modality_html

__all__ = ["write_demo_overview"]


def write_demo_overview(summary: dict, path: str | os.PathLike) -> Path:
    """Write the demo's report.html to `path` from `summary` (the demo's summary.json); returns the path."""
    path = Path(path)
    minutes = summary.get("steps_total_seconds", summary["run_seconds"]) / 60
    parts = ["<h1>moe_nnunet demo <small>· M4oE against nnU-Net's own network, one budget for every model"
             "</small></h1>",
             f"<p>Device <b>{_e(summary['device'])}</b>, mode <b>{_e(summary['mode'])}</b>: in every setting each "
             f"model was trained on fold 0 in nnU-Net's {_e(summary['configuration'])} configuration with the same "
             "narrowed plans and the same number of iterations (the <code>_compare</code> trainers of "
             "<code>moe_nnunet compare</code>), its validation pseudo-Dice followed epoch by epoch, and the fold's "
             "held-out cases scored with nnU-Net's own evaluation. Plateau rule: "
             f"{_e(summary['plateau_rule'])}. The steps took {minutes:.1f} min (this run: "
             f"{summary['run_seconds'] / 60:.1f} min, reusing what was done); written {_e(summary['date'])}; "
             f"{_e(', '.join(f'{k} {v}' for k, v in summary['versions'].items()))}.</p>"]
    if summary.get("note"):
        parts.append(f'<p class="note">{_e(summary["note"])}</p>')
    for key, reason in summary.get("skipped", {}).items():
        parts.append(f'<p class="note">Setting {_e(key)} skipped: {_e(reason)}</p>')
    for r in summary["settings"].values():
        parts.append(_setting_html(r))
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{v:.0f}</td></tr>" for k, v in summary["step_seconds"].items())
    parts.append("<details><summary>Time per step (seconds)</summary><table><tr><th>step</th><th>s</th></tr>"
                 f'{rows}</table><p class="how">Steps reused from an earlier run keep their first time.</p>'
                 "</details>")
    path.write_text('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>moe_nnunet demo</title>'
                    f"<style>{STYLE}</style>\n{IMAGE_CHECK}</head>\n<body>\n" + "\n".join(parts)
                    + "\n</body></html>\n", encoding="utf-8")
    return path


def _setting_html(r: dict) -> str:
    if r.get("modalities"):
        tags = " or ".join(sorted(set(r["modalities"].values())))
        channels = f"one image channel per case, {tags} (a modality tag per case; one expert per modality)"
    else:
        channels = f"channels {', '.join(r['channels'])} (one expert per channel)"
    return "\n".join([f"<h2>{_e(r['title'])}</h2>",
                      f"<p>{_e(r['dataset'])}, {_e(channels)}. Data: {_e(r['data'])}.</p>", _headline_html(r),
                      _training_html(r), _labels_html(r),
                      f'<p><a href="{_e(r["report"])}">Detailed report</a>: Dice per case, gate weights per expert, '
                      "label and case, example segmentations, nnU-Net's training curves.</p>"])


def _headline_html(r: dict) -> str:
    models = list(r["models"])
    head = "".join(f"<th>{_e(m)}</th>" for m in models) + "<th>M4oE gain<br><small>points</small></th>"
    body = []
    for row in r["headline"]:
        gain = row["m4oe_gain_points"]
        cells = _bold_best([(row["dice"].get(m), _fmt(row["dice"].get(m))) for m in models])
        body.append(f"<tr><td>{_e(row['input'])}</td>{''.join(cells)}"
                    f"<td>{'–' if gain is None else f'{gain:+.1f}'}</td></tr>")
    n = len(r["held_out_cases"])
    how = (f"Mean foreground Dice on the {n} held-out cases of fold 0 ({_e(', '.join(r['held_out_cases']))}); bold: "
           "the best model per row. M4oE gain: M4oE's Dice minus the best other model's, in points (1 point = 0.01).")
    if r.get("missing_modality"):
        how += (" Each modality removed in turn (<code>moe_nnunet robustness</code>): M4oE masks the missing "
                "modality's expert, nnU-Net's network gets the channel zero-filled (trained for that with channel "
                "dropout, or not).")
    else:
        how += " From nnU-Net's validation of each model (<code>fold_0/validation/summary.json</code>)."
    stock = r["models"].get("M4oE", {}).get("nnUNetv2_predict")
    if stock:
        how += (f" The same cases predicted with stock <code>nnUNetv2_predict</code> from the M4oE model folder, "
                f"without telling it any case's modality: mean Dice {stock['mean']:.3f}.")
    rising = [m for m, v in r["models"].items() if v["plateau"]["plateaued"] is False]
    unknown = [m for m, v in r["models"].items() if v["plateau"]["plateaued"] is None]
    warning = ""
    if rising:
        warning = (f'<p class="note">Not every model reached its plateau ({_e(", ".join(rising))} still rising: see '
                   "the curves below), so these numbers do not yet compare converged models; give every model a "
                   "larger budget.</p>")
    elif unknown:
        warning = (f'<p class="note">Too few epochs to tell whether {_e(", ".join(unknown))} plateaued, so these '
                   "numbers do not compare converged models.</p>")
    return (f"<h3>Held-out Dice: what the experts buy</h3>\n{warning}<table><tr><th>input</th>{head}</tr>\n"
            + "\n".join(body) + f'</table>\n<p class="how">{how}</p>')


def _widths(m: dict) -> str:
    widths = f"features per stage {m['features_per_stage']}"
    if "expert_features_per_stage" in m:
        widths += f"; per expert {m['expert_features_per_stage']}"
    return widths


def _training_html(r: dict) -> str:
    b = r["budget"]
    budget = (f"Every model: {b['iterations']} training iterations ({b['epochs']} epochs x {b['epoch_iterations']}) "
              f"at batch {b['batch_size']}, patch {'x'.join(map(str, b['patch_size']))} "
              f"({_e(b['configuration'])}), features per stage capped at {b['max_features']}; each point of the "
              f"curve is the validation pseudo-Dice of {b['val_iterations']} batch(es).")
    head = ("<tr><th>model</th><th>parameters</th><th>widths</th><th>s / iteration</th><th>training</th>"
            "<th>pseudo-Dice<br><small>last 25 %</small></th><th>rise<br><small>over the 25 % before</small></th>"
            "<th>verdict</th></tr>")
    body = []
    for model, m in r["models"].items():
        v = m["plateau"]
        rise = "–" if v["rise"] is None else f"{v['rise']:+.3f}"
        body.append(f"<tr><td>{_e(model)}<br><small>{_e(m['trainer'])}</small></td><td>{m['parameters']:,}</td>"
                    f"<td class=\"lab\"><small>{_e(_widths(m))}</small></td><td>{m['seconds_per_iteration']:.3f}</td>"
                    f"<td>{m['training_seconds'] / 60:.1f} min</td><td>{_fmt(v['last_quarter'])}</td><td>{rise}</td>"
                    f"<td><b>{_e(verdict_words(v))}</b></td></tr>")
    how = ("Seconds per iteration: the median epoch's wall time (validation batches included) divided by its training "
           "iterations. Verdict: the plateau rule at the top of the page; fewer than 8 epochs are too short to tell.")
    figure = (f'<figure><img src="{_e(r["curves"])}" alt="validation pseudo-Dice per epoch of every model">'
              '<figcaption class="how">Left: each model\'s validation pseudo-Dice per epoch (nnU-Net\'s '
              "<code>mean_fg_dice</code> on a few validation patches, the values the plateau rule reads) over the "
              "training iterations. Right: the wall time of each epoch."
              "</figcaption></figure>")
    return (f"<h3>Training: one budget, the curves and the plateau</h3>\n<p>{budget}</p>\n<table>{head}\n"
            + "\n".join(body) + f'</table>\n<p class="how">{how}</p>\n{figure}')


def _labels_html(r: dict) -> str:
    models = list(r["models"])
    head = "".join(f"<th>{_e(m)}</th>" for m in models)
    body = []
    for name in r["labels"]:
        values = [r["models"][m]["validation"]["labels"].get(name) for m in models]
        body.append(f"<tr><td>{_e(name)}</td>{''.join(_bold_best([(v, _fmt(v)) for v in values]))}</tr>")
    values = [r["models"][m]["validation"]["mean"] for m in models]
    cells = "".join(_bold_best([(v, _fmt(v)) for v in values]))
    body.append(f'<tr class="total"><td>mean (foreground)</td>{cells}</tr>')
    parts = ["<details><summary>Dice per label</summary>", f"<table><tr><th>label</th>{head}</tr>\n" + "\n".join(body)
             + "</table>", '<p class="how">From nnU-Net\'s validation of each model on the held-out cases '
             "(<code>fold_0/validation/summary.json</code>).</p>"]
    if r.get("missing_modality"):
        parts += ["<h4>With a modality missing, per label</h4>",
                  missing_modality_html(r["missing_modality"], len(r["held_out_cases"]), 0)]
    return "\n".join(parts) + "</details>"
