"""report.html of a model folder, and the missing-modality table (also on the demo's overview page)."""
from __future__ import annotations

import html

from moe_nnunet.evaluation.report.model import Model

__all__ = ["render_html", "missing_modality_html"]


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1100px;margin:2em auto;
padding:0 1.2em;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.02em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{padding:.25em .7em;border-bottom:1px solid #e4e4e4;text-align:right} th{background:#f6f6f6}
td:first-child,th:first-child{text-align:left} tr.total td{border-top:2px solid #bbb}
.meta td{text-align:left;border:none;padding:.1em 1em .1em 0} .meta td:first-child{color:#666}
.how{color:#555;font-size:.93em;max-width:52em} .note{background:#fff8e0;border-left:3px solid #e0b000;padding:.4em .8em}
img{max-width:100%;height:auto} figure{margin:1em 0} small{color:#666;font-weight:normal}
.progress{display:flex;flex-wrap:wrap;gap:1.5em} .progress figure{width:min(100%,520px);margin:0}
details{margin:.8em 0} .wide{overflow-x:auto} summary{cursor:pointer;color:#245} td.lab{text-align:left}
"""
# lets a browser check (and a reader's devtools) tell whether every image loaded
IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesOk = String(imgs.every(function (i) { return i.complete && i.naturalWidth > 0; }));
  document.body.dataset.imagesCount = String(imgs.length);
});
</script>"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(mean, std=None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _img(src: str, alt: str, how: str) -> str:
    return f'<figure><img src="{_e(src)}" alt="{_e(alt)}"><figcaption class="how">{how}</figcaption></figure>'


def render_html(model: Model, others: list[Model], summary: dict, figures: dict) -> str:
    parts = [_header_html(model, summary), _dice_html(model, others, summary), _cases_html(model, others, summary)]
    if summary.get("missing_modality"):
        mm = summary["missing_modality"]
        parts.append("<h2>A modality missing</h2>\n" + missing_modality_html(mm["results"], len(mm["held_out_cases"]),
                                                                            mm["fold"]))
    if summary["gate"]:
        parts.append(_gate_html(summary, figures))
    if "overlays" in figures:
        parts.append(_overlay_html(figures))
    if figures["progress"]:
        parts.append(_progress_html(figures))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(model.dataset)} – '
            f'{_e(model.trainer)}</title><style>{STYLE}</style>\n{IMAGE_CHECK}</head>\n<body>\n'
            + "\n".join(parts) + "\n</body></html>\n")


def _header_html(model: Model, summary: dict) -> str:
    t, v = summary["training"], summary["versions"]
    n_cases = len(summary["per_case"])
    minutes = f"{t['wall_time_s'] / 60:.1f} min" if t["wall_time_s"] >= 60 else f"{t['wall_time_s']:.0f} s"
    rows = [("dataset", model.dataset), ("trainer", model.trainer), ("plans", model.plans),
            ("configuration", model.configuration), ("folds", model.fold_names),
            ("validation cases", n_cases),
            ("training", f"{t['epochs']} epochs, {minutes} of epoch time" + (" (all folds)" if len(model.folds) > 1 else "")),
            ("versions", ", ".join(f"{k} {x}" for k, x in v.items())), ("written", summary["date"]),
            ("model folder", model.path)]
    meta = "".join(f"<tr><td>{_e(k)}</td><td>{_e(x)}</td></tr>" for k, x in rows)
    md = summary["mean_dice"]
    glance = (f"Mean foreground Dice <b>{_fmt(md['mean'])}</b> on {n_cases} held-out validation cases"
              f" (fold{'s' if len(model.folds) > 1 else ''} {_e(model.fold_names)}).")
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in model.notes)
    return (f"<h1>{_e(model.dataset)} <small>· {_e(model.trainer)}</small></h1>\n<p>{glance}</p>{notes}\n"
            f'<table class="meta">{meta}</table>')


def _bold_best(cells: list[tuple[float | None, str]]) -> list[str]:
    """Table cells with the highest value in bold (only when there is something to compare)."""
    known = [round(m, 3) for m, _ in cells if m is not None]
    best = max(known) if len(cells) > 1 and len(set(known)) > 1 else None  # ties are not bold
    return [f"<td><b>{text}</b></td>" if best is not None and m is not None and round(m, 3) == round(best, 3)
            else f"<td>{text}</td>" for m, text in cells]


def _dice_html(model: Model, others: list[Model], summary: dict) -> str:
    models = [(model, summary)] + [(b, summary["baselines"][b.title]) for b in others]
    head = "".join(f"<th>{_e(m.title)}<br><small>fold{'s' if len(m.folds) > 1 else ''} {_e(m.fold_names)}</small></th>"
                   for m, _ in models)
    body = []
    for name, d in summary["dice"].items():
        cells = [(s["dice"].get(name, {}).get("mean"), _fmt(s["dice"].get(name, {}).get("mean"),
                                                            s["dice"].get(name, {}).get("std") if len(m.folds) > 1 else None))
                 for m, s in models]
        body.append(f"<tr><td>{_e(name)} <small>({_e(d['value'])})</small></td>{''.join(_bold_best(cells))}</tr>")
    cells = [(s["mean_dice"]["mean"], _fmt(s["mean_dice"]["mean"], s["mean_dice"]["std"] if len(m.folds) > 1 else None))
             for m, s in models]
    body.append(f'<tr class="total"><td>mean (foreground)</td>{"".join(_bold_best(cells))}</tr>')
    how = ("Dice overlap of prediction and reference on each fold's held-out validation cases, from nnU-Net's own "
           "evaluation (<code>validation/summary.json</code>): 1 is perfect overlap, 0 none. With several folds: mean "
           "± standard deviation over folds.")
    if others:
        how += " Bold: the better model in each row (none where they are equal)."
        if len({m.fold_names for m, _ in models}) > 1:
            how += " <b>The models were validated on different folds, so the columns cover different cases.</b>"
    return (f"<h2>Dice per label</h2>\n<table><tr><th>label</th>{head}</tr>\n" + "\n".join(body)
            + f'</table>\n<p class="how">{how}</p>')


def _cases_html(model: Model, others: list[Model], summary: dict) -> str:
    models = [(model, summary)] + [(b, summary["baselines"][b.title]) for b in others]
    labels = list(summary["dice"]) + ["mean"]
    cases = summary["per_case"]
    order = sorted(cases, key=lambda c: (cases[c]["mean"] is None, cases[c]["mean"] or 0, c))
    key = ""
    if others:
        letters = [chr(ord("A") + i) for i in range(len(models))]
        key = "<p>" + " · ".join(f"<b>{x}</b>: {_e(m.title)}" for x, (m, _) in zip(letters, models)) + "</p>"
        head = ('<tr><th rowspan="2">case</th>' + "".join(f'<th colspan="{len(models)}">{_e(lb)}</th>' for lb in labels)
                + "</tr><tr>" + "".join(f'<th title="{_e(m.title)}">{x}</th>' for _ in labels
                                        for x, (m, _) in zip(letters, models)) + "</tr>")
    else:
        head = "<tr><th>case</th>" + "".join(f"<th>{_e(lb)}</th>" for lb in labels) + "</tr>"
    body = []
    for c in order:
        cells = []
        for lb in labels:
            vals = []
            for _, s in models:
                entry = s["per_case"].get(c)
                vals.append(None if entry is None else entry["mean"] if lb == "mean" else entry["dice"].get(lb))
            cells += _bold_best([(v, _fmt(v)) for v in vals])
        body.append(f"<tr><td>{_e(c)} <small>fold {_e(cases[c]['fold'])}</small></td>{''.join(cells)}</tr>")
    return (f"<details><summary>Dice per validation case ({len(cases)} cases, worst first)</summary>\n"
            f'{key}<div class="wide"><table>{head}\n' + "\n".join(body) + "</table></div>\n<p class=\"how\">– : the label is in neither the "
            "reference nor the prediction of that case (nnU-Net leaves Dice undefined).</p></details>")


def missing_modality_html(results: dict, num_cases: int, fold: int) -> str:
    """Table of `moe_nnunet robustness` results, {model: {condition: {"labels", "mean", "how"}}}: one row per
    condition and label, one column per model, the best per row in bold."""
    models = list(results)
    conditions = list(results[models[0]])
    labels = list(results[models[0]][conditions[0]]["labels"])
    head = "".join(f"<th>{_e(m)}</th>" for m in models)
    body = []
    for condition in conditions:
        how = "; ".join(sorted({f"{m}: {results[m][condition]['how']}" for m in models
                                if results[m][condition]["how"] != "complete"}))
        title = f'<td rowspan="{len(labels) + 1}" title="{_e(how)}"><b>{_e(condition)}</b></td>'
        for i, label in enumerate(labels + ["mean"]):
            values = [results[m][condition]["mean" if label == "mean" else "labels"] for m in models]
            values = [v if label == "mean" else v.get(label) for v in values]
            cls = ' class="total"' if label == "mean" else ""
            body.append(f"<tr{cls}>{title if i == 0 else ''}<td class=\"lab\">{_e(label)}</td>"
                        f"{''.join(_bold_best([(v, _fmt(v)) for v in values]))}</tr>")
    how = (f"Dice on the {num_cases} held-out cases of fold {fold}, predicted with the full input and with each "
           "modality removed in turn (<code>moe_nnunet robustness</code>, nnU-Net's own evaluation). M4oE models "
           "mask the missing modality's expert; nnU-Net's network gets the channel zero-filled after normalisation "
           "(trained for that with modality dropout, or not). A label seen only in the removed modality cannot be "
           "found by any model: compare the models per row. Bold: the best model in each row.")
    return (f'<table><tr><th>input</th><th>label</th>{head}</tr>\n' + "\n".join(body)
            + f'</table>\n<p class="how">{how}</p>')


def _gate_html(summary: dict, figures: dict) -> str:
    gate, parts = summary["gate"], ["<h2>Gate: which expert the model trusts</h2>"]
    experts = ", ".join(gate["experts"])
    parts.append(f'<p class="how">The model has one expert per modality ({_e(experts)}); at every voxel and scale a '
                 "gate gives each expert a weight, the weights summing to 1. A weight near 1 means the gate trusts that "
                 "expert for those voxels; the dashed line is an even split between the experts.</p>")
    if "gate_epochs" in figures:
        parts.append("<h3>During training</h3>")
        parts.append(_img(figures["gate_epochs"], "gate weight per expert over the epochs",
                          "Each line is one expert's mean weight over the training batches of an epoch"
                          + (", averaged over the folds" if len(summary["model"]["folds"]) > 1 else "")
                          + ". Lines drifting apart show the gate learning to prefer some modalities."))
        parts.append("<h3>Per scale and per label, at the end of training</h3>")
        parts.append(_img(figures["gate_groups"], "gate weight per scale and label at the last epoch",
                          "Each bar splits the gate weight among the experts at the last recorded epoch: over all "
                          "scales, at each scale of the network (scale 1 is full resolution), for the voxels of each "
                          "reference label (at full resolution) and, for datasets combining modalities, for the cases "
                          "of each modality. The dashed lines mark the even split."))
    if "gate_cases" in figures:
        parts.append("<h3>Per validation case</h3>")
        parts.append(_img(figures["gate_cases"], "gate weight per validation case",
                          "One bar per held-out validation case (from <code>gate_weights_validation.json</code>), "
                          "best mean Dice at the top: a case whose bar differs from the others is one the gate routed "
                          "differently, often worth a look at its images."))
    return "\n".join(parts)


def _overlay_html(figures: dict) -> str:
    cases = "; ".join(f"{_e(c)}: {_e(role)} mean Dice ({_fmt(d)})" for c, role, d in figures["overlay_cases"])
    background = figures.get("overlay_background")
    on = f" drawn on the {_e(background)} image" if background else " (raw images not found under $nnUNet_raw)"
    return ("<h2>Example segmentations</h2>\n" + _img("overlays.png", "input channels, reference and predictions",
            f"One row per validation case ({cases}), at the axial slice with the most reference foreground, in "
            f"radiological view (the patient's right on the left). Columns: each input channel, then the reference "
            f"and each model's prediction{on}, coloured by label as in the legend."))


def _progress_html(figures: dict) -> str:
    items = "".join(f'<figure><a href="{_e(src)}">{_img(src, f"training curves of fold {fold}", f"fold {_e(fold)}")}'
                    f"</a></figure>" for fold, src in figures["progress"])
    return ("<h2>Training curves (nnU-Net)</h2>\n<p class=\"how\">nnU-Net's <code>progress.png</code> of each fold "
            "(click to enlarge). Top: training loss (blue) and validation loss (red), with the pseudo Dice on the "
            "validation patches (green, dotted; solid: moving average). Middle: seconds per epoch. Bottom: learning "
            f'rate.</p>\n<div class="progress">{items}</div>')
