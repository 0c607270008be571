"""report.html: one page that shows a whole prediction run at a glance, for the person who checks
every automatic contour before it is used.

The page is self-contained: inline CSS, no JavaScript, no network, and its figures embedded as
base64 data URIs, so report.html alone (mailed, or copied out of the output folder) still shows
every figure; a click on a figure enlarges it (a CSS-only toggle). The NIfTI and DICOM outputs
are relative links, which work while the page sits in its output folder. Cases are listed worst
first (lowest mean foreground Dice with labels, highest organ uncertainty without), each with its
figures, per-organ numbers, review flag and the paths of its outputs. Where the cases belong to
patients scanned over several weeks, each patient follows with its organ volumes week by week.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import mimetypes
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from pelvicseg.atomic import write_text
from pelvicseg.palette import class_colours

log = logging.getLogger("hipmri")

REPORT_NAME = "report.html"
RUN_FILES = ("metrics.csv", "summary.json", "predict_config.json")  # linked when present in the folder
# Displayed precision per metric; each number's title (its tooltip) holds the value as metrics.csv
# writes it (6 significant digits), so the page reads easily and still matches the files exactly.
DIGITS = {"dice": 3, "hd95": 2, "pred_volume_ml": 2, "gt_volume_ml": 2, "uncertainty": 3}
CASE_COLUMNS_WITH_LABELS = (("pred_volume_ml", "predicted ml"), ("gt_volume_ml", "true ml"), ("dice", "Dice"),
                            ("hd95", "HD95 mm"), ("uncertainty", "uncertainty"))
CASE_COLUMNS_WITHOUT_LABELS = (("pred_volume_ml", "predicted ml"), ("uncertainty", "uncertainty"))
MISSING = "–"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 14px; color: #222;
       max-width: 1280px; margin: 0 auto; padding: 12px 16px; }
h1 { font-size: 20px; margin: 4px 0 8px; }
h2 { font-size: 16px; margin: 18px 0 6px; }
table { border-collapse: collapse; }
th, td { padding: 3px 6px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 1px solid #999; font-weight: 600; }
table.classes tbody tr:nth-child(even) { background: #f6f6f6; }
table.cases { width: 100%; table-layout: fixed; }
table.cases > tbody > tr.case > td { border-top: 2px solid #bbb; padding: 8px 6px; text-align: left; }
td.info { width: 24%; }
td.organs { width: 40%; }
td.organs table { width: 100%; font-size: 13px; }
td.organs td, td.organs th { padding: 1px 4px; }
.swatch { display: inline-block; width: 11px; height: 11px; border: 1px solid #555; margin-right: 5px;
          vertical-align: -1px; }
.flag { display: inline-block; background: #b2182b; color: #fff; border-radius: 3px; padding: 0 6px;
        font-weight: 600; }
.clear { color: #1a7f37; font-weight: 600; }
td.flagged { background: #fddbc7; font-weight: 700; }
.paths, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; overflow-wrap: anywhere; }
.paths { margin: 6px 0 0; padding-left: 16px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; text-align: center; font-size: 11px; color: #555; }
img.thumb { height: 130px; width: auto; max-width: 100%; border: 1px solid #ccc; }
label.zoom { display: block; cursor: zoom-in; }
label.zoom input { display: none; }
label.zoom input:checked + img.thumb { position: fixed; inset: 0; margin: auto; z-index: 10; width: 96vw;
  height: 94vh; max-width: none; object-fit: contain; border: 1px solid #888; background: #fff;
  cursor: zoom-out; box-shadow: 0 0 0 100vmax rgba(0, 0, 0, 0.6); }
.note { color: #555; font-size: 12px; }
.warning { background: #fddbc7; border-left: 4px solid #b2182b; padding: 4px 8px; }
table.skipped td { text-align: left; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.over-weeks { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
table.weeks td:nth-child(2), table.weeks th:nth-child(2) { text-align: left; }
table.weeks td span.change { display: block; font-size: 11px; color: #555; }
table.weeks td.flagged span.change { color: #222; }
@media (max-width: 1000px) {
  table.cases > tbody > tr.case > td { display: block; width: auto; border-top: none; }
  table.cases > tbody > tr.case > td.info { border-top: 2px solid #bbb; }
}
"""


def write_report(out_dir: str | Path, cases: Sequence[dict], summary: dict | None, class_names: Sequence[str],
                 title: str = "Prediction report", run_figures: Sequence[str | Path] = (),
                 skipped: Sequence[dict] = (), warnings: Sequence[str] = (),
                 longitudinal: dict | None = None, review_rule: dict | None = None,
                 adaptation: dict | None = None) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``cases``: one dict per predicted case::

        {"case_id": str,
         "prediction_path": str | Path,          # the labels NIfTI; absolute, or relative to out_dir
         "uncertainty_path": str | Path | None,  # the entropy NIfTI
         "image_path": str | Path | None,        # the source image
         "rtstruct_path": str | Path,             # optional: the RT Structure Set (DICOM input only)
         "rtstruct_absent": [str, ...],           # optional: organs left out of it (no voxel)
         "dicom_series": str,                     # optional: the series it was predicted from
         "seg_path": str | Path,                  # optional: the DICOM Segmentation (DICOM input only)
         "figures": [str | Path, ...],           # PNG files, relative to out_dir, embedded as thumbnails
         "metrics": {class_name: {"pred_volume_ml": float, "uncertainty": float | None,
                                  "gt_volume_ml": float, "dice": float, "hd95": float}},  # last 3 with labels
         "flags": [...]}                          # uncertainty.flag_case's list; empty: no flag

    Missing numbers are None or NaN; the background, if present in ``metrics``, is not shown.
    A case's mean foreground Dice (its sort key with labels) is the mean of its finite foreground
    Dice; its uncertainty (the sort key without) is its largest organ score.

    ``summary``: predict.py's summary.json dict (``per_class_dice``, ``per_class_dice_std``,
    ``per_class_hd95``, and where present ``per_class_hd95_std`` and ``per_class_misses``),
    or None for a run without labels. Statistics it lacks are computed from ``cases`` the same
    way (mean and population std over finite values; a miss is an organ with a true volume but no
    predicted one, or the reverse). ``run_figures``: PNG files (relative to out_dir) for the
    whole run, e.g. the Dice box plot. Figures are embedded (the page grows by about 4/3 of their
    bytes); output files are linked. ``skipped``: the DICOM series not predicted, as
    ``{"folder", "series", "reason"}``; ``warnings``: lines the reader must see first (a series
    of a modality the model was not trained on). ``longitudinal``: longitudinal.write_longitudinal's
    dict (``rows`` of longitudinal.csv, ``volume_change``, ``figures`` {patient: PNG}); each
    patient gets a section with its figure and a table of its weeks. ``review_rule``: summary.json's
    ``review_rule`` (None where no rule applies); its ``held_out`` rate is shown beside the flag
    count, so a reader can tell a rule that is always on from cases less certain than validation's.
    ``adaptation``: for an adapted model, ``Segmenter.adaptation`` (its parent and, per organ,
    "adapted" or "parent"); the page says which organs come from the adapted model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    foreground = list(class_names[1:])
    colours = dict(zip(class_names, class_colours(len(class_names))))
    has_labels = summary is not None or any(_finite(_metric(case, name, "dice"))
                                            for case in cases for name in foreground)
    ordered = sort_cases(cases, foreground, has_labels)
    anchors = {id(case): f"case-{rank}" for rank, case in enumerate(ordered, start=1)}

    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_text(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>{_text(title)}</h1>"]
    parts += [f'<p class="warning"><strong>Warning:</strong> {_text(line)}</p>' for line in warnings]
    parts += _overview(out_dir, ordered, summary, has_labels, anchors, review_rule)
    if adaptation:
        parts += _adaptation_note(adaptation)
    parts += _patients_line(longitudinal)
    parts += _class_table(ordered, summary, foreground, colours, has_labels)
    if run_figures:
        parts += ["<h2>Run figures</h2>", '<div class="thumbs">']
        parts += [_thumbnail(out_dir, figure, "") for figure in run_figures]
        parts += ["</div>"]
    parts += _case_table(out_dir, ordered, foreground, colours, has_labels, anchors)
    parts += _patient_sections(out_dir, longitudinal, foreground, colours,
                               {case["case_id"]: anchors[id(case)] for case in ordered})
    parts += _skipped_table(skipped)
    parts += ["</body>", "</html>"]
    path = out_dir / REPORT_NAME
    write_text(path, "\n".join(parts) + "\n")
    return path


# ----------------------------------------------------------------------------- per-case values

def mean_foreground_dice(case: dict, foreground: Sequence[str]) -> float | None:
    values = [_metric(case, name, "dice") for name in foreground]
    finite = [v for v in values if _finite(v)]
    return float(np.mean(finite)) if finite else None


def largest_uncertainty(case: dict, foreground: Sequence[str]) -> float | None:
    finite = [v for v in (_metric(case, name, "uncertainty") for name in foreground) if _finite(v)]
    return float(max(finite)) if finite else None


def sort_cases(cases: Sequence[dict], foreground: Sequence[str], has_labels: bool) -> list[dict]:
    """Worst first: by mean foreground Dice (ascending) with labels, by largest organ uncertainty
    (descending) without; cases lacking the key go last, ties in case-id order."""
    def key(case):
        if has_labels:
            value = mean_foreground_dice(case, foreground)
            return (value is None, value if value is not None else 0.0, str(case["case_id"]))
        value = largest_uncertainty(case, foreground)
        return (value is None, -value if value is not None else 0.0, str(case["case_id"]))
    return sorted(cases, key=key)


# ----------------------------------------------------------------------------- page sections

def _adaptation_note(adaptation: dict) -> list[str]:
    organs = adaptation.get("organs") or {}
    adapted = [name for name, source in organs.items() if source == "adapted"]
    kept = [name for name, source in organs.items() if source != "adapted"]
    guard = (" An adapted organ that disagrees grossly with the parent's on a scan is replaced by the parent's, and "
             "the case is flagged." if adaptation.get("guard") else "")
    return [f'<p class="adaptation" data-adapted="{_text(",".join(adapted))}" data-parent="{_text(",".join(kept))}">'
            f'Patient-adapted model. Organs from the adapted model: <strong>{_text(", ".join(adapted) or "none")}'
            f'</strong>; from its parent (<span class="mono">{_text(adaptation.get("parent", ""))}</span>): '
            f'<strong>{_text(", ".join(kept) or "none")}</strong>.{guard}</p>']


def _overview(out_dir: Path, cases, summary, has_labels, anchors, review_rule) -> list[str]:
    flagged = [case for case in cases if case.get("flags")]
    lines = [f"<p>{len(cases)} case(s), {'with' if has_labels else 'without'} labels; "
             f"<strong>{len(flagged)}</strong> flagged for review.</p>"]
    held_out = review_rule.get("held_out") if isinstance(review_rule, dict) else None
    if held_out:
        lines.append(f'<p class="note">A flag: an organ the model is less sure of than of that organ on its typical '
                     f'validation case. On validation {held_out["held_out"]}s it was not fitted on, the rule flags '
                     f'{held_out["n_flagged_volumes"]} of {held_out["n_volumes"]} volume(s) '
                     f'({held_out["n_flagged_organs"]} of {held_out["n_organs"]} organs).</p>')
    if summary and summary.get("checkpoint"):
        lines.append(f'<p class="note">Checkpoint: <span class="mono">{_text(summary["checkpoint"])}</span></p>')
    if summary and _finite(summary.get("mean_foreground_dice")):
        value = summary["mean_foreground_dice"]
        lines.append(f'<p>Mean foreground Dice: <span title="{_exact(value)}">{_rounded(value, "dice")}</span></p>')
    if flagged:
        items = [f'<li><a href="#{anchors[id(case)]}">{_text(case["case_id"])}</a>: {_flag_text(case["flags"])}</li>'
                 for case in flagged]
        lines += ["<p>Flagged for review (worst first):</p>", "<ul>", *items, "</ul>"]
    present = [name for name in RUN_FILES if (out_dir / name).is_file()]
    if present:
        lines.append("<p>Files: " + " · ".join(_link(out_dir, name, name) for name in present) + "</p>")
    lines.append(f'<p class="note">Numbers are rounded for reading; hover over one for the value as '
                 f'metrics.csv writes it. {MISSING} means not defined (organ absent, or no labels). '
                 f'Click a figure to enlarge it, and again to close it.</p>')
    return lines


def _class_table(cases, summary, foreground, colours, has_labels) -> list[str]:
    header = ["organ"] + (["Dice mean ± std", "HD95 mean ± std (mm)", "misses"] if has_labels else []) + [
        "predicted ml (mean)", "uncertainty (mean)", "cases flagged"]
    lines = ["<h2>Per organ</h2>", '<table class="classes">',
             "<thead><tr>" + "".join(f"<th>{_text(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for name in foreground:
        cells = [f"<td>{_swatch(colours[name])}{_text(name)}</td>"]
        if has_labels:
            dice = [_metric(case, name, "dice") for case in cases]
            hd95 = [_metric(case, name, "hd95") for case in cases]
            cells.append(_mean_std_cell("dice", _from_summary(summary, "per_class_dice", name, dice, _mean),
                                        _from_summary(summary, "per_class_dice_std", name, dice, _std)))
            cells.append(_mean_std_cell("hd95", _from_summary(summary, "per_class_hd95", name, hd95, _mean),
                                        _from_summary(summary, "per_class_hd95_std", name, hd95, _std)))
            misses = (summary or {}).get("per_class_misses", {}).get(name)
            if misses is None:
                misses = sum(_is_miss(case, name) for case in cases)
            cells.append(f'<td data-metric="misses">{int(misses)}</td>')
        volumes = _mean([_metric(case, name, "pred_volume_ml") for case in cases])
        scores = _mean([_metric(case, name, "uncertainty") for case in cases])
        flagged = sum(any(flag["organ"] == name for flag in case.get("flags") or ()) for case in cases)
        cells += [_number_cell(volumes, "pred_volume_ml"), _number_cell(scores, "uncertainty"),
                  f'<td data-metric="flagged">{flagged}</td>']
        lines.append(f'<tr data-organ="{_text(name)}">' + "".join(cells) + "</tr>")
    return lines + ["</tbody>", "</table>"]


def _case_table(out_dir, cases, foreground, colours, has_labels, anchors) -> list[str]:
    order = "lowest mean foreground Dice first" if has_labels else "highest organ uncertainty first"
    lines = [f"<h2>Cases ({order})</h2>", '<table class="cases">', "<tbody>"]
    columns = CASE_COLUMNS_WITH_LABELS if has_labels else CASE_COLUMNS_WITHOUT_LABELS
    for rank, case in enumerate(cases, start=1):
        flags = case.get("flags") or []
        flagged_organs = {flag["organ"] for flag in flags}
        case_id = _text(case["case_id"])
        info = [f"<strong>{rank}. {case_id}</strong><br>",
                (f'<span class="flag">review</span> {_flag_text(flags)}' if flags
                 else '<span class="clear">no flag</span>')]
        dice = mean_foreground_dice(case, foreground)
        if has_labels:
            info.append(f'<br>mean foreground Dice <span data-metric="mean_foreground_dice" title="{_exact(dice)}">'
                        f'{_rounded(dice, "dice")}</span>')
        score = largest_uncertainty(case, foreground)
        info.append(f'<br>largest organ uncertainty <span data-metric="largest_uncertainty" '
                    f'title="{_exact(score)}">{_rounded(score, "uncertainty")}</span>')
        outputs = [("prediction", case.get("prediction_path")), ("uncertainty", case.get("uncertainty_path")),
                   ("RTSTRUCT", case.get("rtstruct_path")), ("DICOM-SEG", case.get("seg_path")),
                   ("image", case.get("image_path"))]
        info.append('<ul class="paths">' + "".join(f"<li>{label}: {_link(out_dir, path, str(path))}</li>"
                                                    for label, path in outputs if path)
                    + (f"<li>DICOM series: {_text(case['dicom_series'])}</li>" if case.get("dicom_series") else "")
                    + "</ul>")
        if case.get("rtstruct_absent"):
            info.append(f'<p class="note">Left out of the RTSTRUCT (no voxel predicted): '
                        f'{_text(", ".join(case["rtstruct_absent"]))}</p>')

        organ_rows = ["<table><thead><tr><th>organ</th>" + "".join(f"<th>{_text(h)}</th>" for _, h in columns)
                      + "</tr></thead><tbody>"]
        for name in foreground:
            cells = [f"<td>{_swatch(colours[name])}{_text(name)}</td>"]
            for metric, _ in columns:
                flagged = metric == "uncertainty" and name in flagged_organs
                cells.append(_number_cell(_metric(case, name, metric), metric,
                                          css_class="flagged" if flagged else None))
            organ_rows.append(f'<tr data-organ="{_text(name)}">' + "".join(cells) + "</tr>")
        organ_rows.append("</tbody></table>")

        thumbs = [_thumbnail(out_dir, figure, str(case["case_id"])) for figure in case.get("figures") or ()]
        lines += [f'<tr class="case" id="{anchors[id(case)]}" data-case="{case_id}">',
                  '<td class="info">' + "".join(info) + "</td>",
                  '<td class="organs">' + "".join(organ_rows) + "</td>",
                  '<td class="figures"><div class="thumbs">' + "".join(thumbs) + "</div></td>", "</tr>"]
    return lines + ["</tbody>", "</table>"]


def _patients_line(longitudinal) -> list[str]:
    rows = (longitudinal or {}).get("rows") or []
    if not rows:
        return []
    patients = {str(r["patient"]) for r in rows}
    flagged = {str(r["patient"]) for r in rows if r["flagged"]}
    return [f'<p><a href="#patients">{len(patients)} patient(s) over the weeks</a>: <strong>{len(flagged)}</strong> '
            f'with an organ volume more than {_percent(longitudinal["volume_change"])} off its first week\'s.</p>']


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _patient_sections(out_dir, longitudinal, foreground, colours, case_anchors) -> list[str]:
    """Per patient: its volume figure and a table of its weeks, each organ's predicted volume and
    its change against the first week, the cells above the threshold highlighted."""
    rows = (longitudinal or {}).get("rows") or []
    if not rows:
        return []
    threshold = longitudinal["volume_change"]
    patients: dict[str, list[dict]] = {}
    for row in rows:
        patients.setdefault(str(row["patient"]), []).append(row)
    flagged = [p for p, mine in patients.items() if any(r["flagged"] for r in mine)]
    lines = [f'<h2 id="patients">Patients over the weeks ({len(patients)})</h2>',
             f'<p class="note">Predicted volumes in ml and, under each, the change against the patient\'s first '
             f'week as a share of that week\'s volume; highlighted: a change of more than '
             f'<span data-threshold="{threshold:g}">{_percent(threshold)}</span> (--volume-change {threshold:g}). '
             f'{len(flagged)} of {len(patients)} patient(s) have a highlighted week. Values as longitudinal.csv '
             f'writes them in the tooltips.</p>']
    for number, (patient, mine) in enumerate(patients.items(), start=1):
        organs = [name for name in foreground if any(r["organ"] == name for r in mine)]
        table = ['<table class="weeks classes"><thead><tr><th>week</th><th>case</th>'
                 + "".join(f"<th>{_swatch(colours[name])}{_text(name)} ml</th>" for name in organs)
                 + "</tr></thead><tbody>"]
        weeks = list(dict.fromkeys((r["week"], r["case"]) for r in mine))
        for index, (week, case_id) in enumerate(weeks):
            cells = {r["organ"]: r for r in mine if r["week"] == week and r["case"] == case_id}
            anchor = case_anchors.get(case_id)
            case_text = f'<a href="#{anchor}">{_text(case_id)}</a>' if anchor else _text(case_id)
            week_flagged = any(r["flagged"] for r in cells.values())
            row = [f'<td data-week="{_text(week)}">{_text(week)}{" (first)" if index == 0 else ""}</td>',
                   f'<td class="mono">{case_text}</td>']
            row += [_week_cell(cells[name]) for name in organs]
            table.append(f'<tr data-case="{_text(case_id)}" data-flagged="{int(week_flagged)}">' + "".join(row)
                         + "</tr>")
        table.append("</tbody></table>")
        figure = (longitudinal.get("figures") or {}).get(patient)
        body = '<div class="over-weeks">' + (_thumbnail(out_dir, figure, "") if figure else "") + "".join(table) \
            + "</div>"
        lines += [f'<section class="patient" id="patient-{number}" data-patient="{_text(patient)}">',
                  f"<h3>Patient {_text(patient)}: {len(weeks)} week(s)"
                  + (' <span class="flag">volume change</span>' if patient in flagged else "") + "</h3>",
                  body, "</section>"]
    return lines


def _week_cell(row: dict) -> str:
    """One organ in one week: its volume, and under it the change against the first week (``new``
    where the first week has none of it)."""
    volume, change, fraction = row["volume_ml"], row["change_ml"], row["change_fraction"]
    change_text = "new" if math.isinf(fraction) else f"{fraction:+.1%}".replace("%", " %")
    title = f"change {_exact(change)} ml, {_exact(fraction) or 'inf'} of the first week"
    css = ' class="flagged"' if row["flagged"] else ""
    return (f'<td data-organ="{_text(row["organ"])}"{css}>'
            f'<span data-metric="volume_ml" title="{_exact(volume)}">{_rounded(volume, "pred_volume_ml")}</span>'
            f'<span class="change" data-metric="change_fraction" title="{_text(title)}">{change_text}</span></td>')


def _skipped_table(skipped: Sequence[dict]) -> list[str]:
    if not skipped:
        return []
    lines = [f"<h2>Skipped series ({len(skipped)})</h2>", '<table class="skipped classes">',
             "<thead><tr><th>series</th><th>folder</th><th>reason</th></tr></thead>", "<tbody>"]
    for item in skipped:
        lines.append(f'<tr data-skipped="{_text(item["series"])}"><td>{_text(item["series"])}</td>'
                     f'<td class="mono">{_text(item["folder"])}</td><td>{_text(item["reason"])}</td></tr>')
    return lines + ["</tbody>", "</table>"]


# ----------------------------------------------------------------------------- small pieces

def _text(value) -> str:
    return html.escape(str(value), quote=True)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.number)) and math.isfinite(float(value))


def _metric(case: dict, name: str, metric: str):
    return (case.get("metrics") or {}).get(name, {}).get(metric)


def _exact(value) -> str:
    """As metrics.csv writes a number (predict's ``f"{v:.6g}"``)."""
    return f"{float(value):.6g}" if _finite(value) else ""


def _rounded(value, metric: str) -> str:
    return f"{float(value):.{DIGITS[metric]}f}" if _finite(value) else MISSING


def _number_cell(value, metric: str, css_class: str | None = None) -> str:
    attributes = f' data-metric="{metric}"' + (f' class="{css_class}"' if css_class else "")
    if _finite(value):
        attributes += f' title="{_exact(value)}"'
    return f"<td{attributes}>{_rounded(value, metric)}</td>"


def _mean_std_cell(metric: str, mean, std) -> str:
    if not _finite(mean):
        return f'<td data-metric="{metric}">{MISSING}</td>'
    text = f'<span data-stat="mean" title="{_exact(mean)}">{_rounded(mean, metric)}</span>'
    if _finite(std):
        text += f' ± <span data-stat="std" title="{_exact(std)}">{_rounded(std, metric)}</span>'
    return f'<td data-metric="{metric}">{text}</td>'


def _finite_values(values) -> np.ndarray:
    return np.array([float(v) for v in values if _finite(v)])


def _mean(values) -> float | None:
    finite = _finite_values(values)
    return float(finite.mean()) if finite.size else None


def _std(values) -> float | None:
    finite = _finite_values(values)
    return float(finite.std()) if finite.size else None


def _from_summary(summary: dict | None, key: str, name: str, values, statistic):
    if summary is not None and key in summary:
        return summary[key].get(name)
    return statistic(values)


def _is_miss(case: dict, name: str) -> bool:
    true_volume, predicted_volume = _metric(case, name, "gt_volume_ml"), _metric(case, name, "pred_volume_ml")
    if not (_finite(true_volume) and _finite(predicted_volume)):
        return False
    return (true_volume > 0) != (predicted_volume > 0)


def _flag_text(flags: Sequence[dict]) -> str:
    parts = []
    for flag in flags:
        if flag.get("reason") not in (None, "uncertain", "not predicted"):
            parts.append(f"{_text(flag['organ'])}: {_text(flag['reason'])}")
        elif flag.get("score") is None:
            parts.append(f"{_text(flag['organ'])} not predicted")
        else:
            parts.append(f"{_text(flag['organ'])} {flag['score']:.3f} &gt; {flag['threshold']:.3f}")
    return "; ".join(parts)


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{_text(colour)}"></span>'


def _href(out_dir: Path, path: str | Path) -> tuple[str, bool]:
    """A relative URL from the report to ``path`` (absolute, or relative to out_dir), and whether
    the file exists."""
    target = Path(path) if Path(path).is_absolute() else out_dir / path
    relative = Path(os.path.relpath(target, out_dir)).as_posix()
    return quote(relative), target.is_file()


def _link(out_dir: Path, path: str | Path, text: str) -> str:
    href, exists = _href(out_dir, path)
    if not exists:
        log.warning("report: %s does not exist; listed without a link", path)
        return f"{_text(text)} (missing)"
    return f'<a href="{_text(href)}">{_text(text)}</a>'


def _thumbnail(out_dir: Path, figure: str | Path, case_id: str) -> str:
    """The figure embedded as a data URI inside a label whose hidden checkbox enlarges it."""
    target = Path(figure) if Path(figure).is_absolute() else out_dir / figure
    caption = Path(figure).stem
    if case_id and caption.startswith(case_id):
        caption = caption[len(case_id):].lstrip("_-") or caption
    if not target.is_file():
        log.warning("report: figure %s does not exist; left out", figure)
        return f"<figure>{_text(caption)} (missing)</figure>"
    mime = mimetypes.guess_type(target.name)[0] or "image/png"
    data = base64.b64encode(target.read_bytes()).decode("ascii")
    return (f'<figure><label class="zoom" title="click to enlarge, click again to close"><input type="checkbox">'
            f'<img class="thumb" src="data:{mime};base64,{data}" alt="{_text(caption)}"></label>'
            f'<figcaption>{_text(caption.replace("_", " "))}</figcaption></figure>')
