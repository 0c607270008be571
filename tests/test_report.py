"""report.py: report.html parses with the standard library's html.parser, is self-contained (every
image embedded as a PNG data URI, so the page copied alone still shows them; every file it links
exists in or beside the output folder; nothing on the network, no script), lists cases worst
first, and shows the very numbers of metrics.csv and summary.json (each number's tooltip is the
file's value; its text the same number rounded). A run without labels still gets a report with
volumes and uncertainty; a case with an RTSTRUCT or DICOM-SEG links them.

The run folder is built here as predict.py writes it: tiny NIfTI outputs, PNG figures, and a
metrics.csv written with predict's number format (``f"{v:.6g}"``).
"""

from __future__ import annotations

import base64
import csv
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest

from pelvicseg.figures import class_colours
from pelvicseg.report import DIGITS, MISSING, write_report

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
FOREGROUND = CLASS_NAMES[1:]
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# per case, Dice of body .. prostate: case B has a rectum predicted where there is none (Dice 0),
# case C a missed prostate (Dice 0); a case id with markup characters checks the escaping
DICE = {"Case_004_Week0": [0.98, 0.90, 0.92, 0.80, 0.75],
        "Case_005_Week1": [0.97, 0.88, 0.60, 0.0, 0.70],
        "Case_<006>&_Week2": [0.99, 0.91, 0.93, 0.85, 0.0]}
EXPECTED_ORDER = ["Case_005_Week1", "Case_<006>&_Week2", "Case_004_Week0"]  # mean Dice 0.63, 0.736, 0.87
FLAGS = {"Case_005_Week1": [{"organ": "bladder", "score": 0.4123456, "threshold": 0.3, "reason": "uncertain"}],
         "Case_<006>&_Week2": [{"organ": "prostate", "score": None, "threshold": 0.25, "reason": "not predicted"}]}


# ----------------------------------------------------------------------------- a run folder

def write_png(path: Path) -> str:
    """A small PNG whose bytes differ from file to file, so an embedded copy names its file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.random.default_rng(sum(path.name.encode())).uniform(size=(8, 8)))
    return path.as_posix()


def write_nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4)), str(path))
    return path


def case_values(case_id: str, labelled: bool, rng) -> dict[str, dict[str, float]]:
    """Per class: volumes with many digits (so rounding shows), uncertainty NaN where not predicted."""
    metrics = {}
    for c, name in enumerate(CLASS_NAMES):
        dice = 0.995 if c == 0 else DICE[case_id][c - 1]
        true_volume = float(rng.uniform(1, 3000))
        predicted_volume = float(true_volume * rng.uniform(0.8, 1.2))
        if case_id == "Case_005_Week1" and name == "rectum":
            true_volume = 0.0  # predicted where there is none
        if case_id == "Case_<006>&_Week2" and name == "prostate":
            predicted_volume = 0.0  # missed
        values = {"pred_volume_ml": predicted_volume,
                  "uncertainty": math.nan if predicted_volume == 0 or c == 0 else float(rng.uniform(0.01, 0.5))}
        if case_id == "Case_005_Week1" and name == "bladder":
            values["uncertainty"] = FLAGS[case_id][0]["score"]  # the score that flags it
        if labelled:
            hd95 = math.nan if dice == 0 else float(rng.uniform(1, 20))
            values.update(dice=dice, hd95=hd95, gt_volume_ml=true_volume)
        metrics[name] = values
    return metrics


def make_run(tmp_path: Path, labelled: bool = True):
    """(out_dir, cases, summary, metrics.csv rows): the outputs of a 3-case prediction run."""
    out_dir, input_dir = tmp_path / "preds", tmp_path / "input"
    rng = np.random.default_rng(7)
    cases, rows = [], []
    for case_id in DICE:
        metrics = case_values(case_id, labelled, rng)
        cases.append({
            "case_id": case_id,
            "prediction_path": write_nifti(out_dir / f"{case_id}_pred.nii.gz").relative_to(out_dir).as_posix(),
            "uncertainty_path": str(write_nifti(out_dir / f"{case_id}_uncertainty.nii.gz")),  # absolute also works
            "image_path": str(write_nifti(input_dir / f"{case_id}.nii.gz")),
            "figures": [Path(write_png(out_dir / "figures" / f"{case_id}_{kind}.png")).relative_to(out_dir).as_posix()
                        for kind in (["best_slices", "uncertainty"] if labelled else ["overview", "uncertainty"])],
            "metrics": metrics,
            "flags": FLAGS.get(case_id, []),
        })
        rows += [{"case": case_id, "class": name, **metrics[name]} for name in CLASS_NAMES]
    fields = ["case", "class", "dice", "hd95", "gt_volume_ml", "pred_volume_ml", "uncertainty"]
    with open(out_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f for f in fields if f in rows[0]])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    summary = None
    if labelled:
        summary = expected_summary(cases)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir, cases, summary


def expected_summary(cases) -> dict:
    def per_class(metric, statistic):
        result = {}
        for name in CLASS_NAMES:
            values = np.array([case["metrics"][name][metric] for case in cases])
            values = values[np.isfinite(values)]
            result[name] = float(statistic(values)) if values.size else None
        return result

    misses = {name: sum((case["metrics"][name]["gt_volume_ml"] > 0) != (case["metrics"][name]["pred_volume_ml"] > 0)
                        for case in cases) for name in CLASS_NAMES}
    assert misses["rectum"] == 1 and misses["prostate"] == 1 and misses["bladder"] == 0
    dice = per_class("dice", np.mean)
    return {"per_class_dice": dice, "per_class_dice_std": per_class("dice", np.std),
            "mean_foreground_dice": float(np.mean([dice[n] for n in FOREGROUND])),
            "per_class_hd95": per_class("hd95", np.mean), "per_class_misses": misses, "n_cases": len(cases),
            "checkpoint": "runs/demo/best.pt",
            "flagged": [{"case": case_id, **flag} for case_id, flags in FLAGS.items() for flag in flags]}


def read_metrics_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path) as handle:
        return {(row["case"], row["class"]): row for row in csv.DictReader(handle)}


# ----------------------------------------------------------------------------- reading the page

class ReportReader(HTMLParser):
    """Collects what the tests check: the tag nesting, every reference, ids, and each number cell
    keyed by (case or None for the per-organ table, organ, metric)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors = [], []
        self.references, self.ids, self.thumbnails = [], set(), []
        self.case_order, self.case_ids_shown = [], []
        self.cells, self.summary_stats, self.swatches = {}, {}, {}
        self.case = self.organ = None
        self.open_cell = self.open_stat = None
        self.open_link = None
        self.zoom_label = None  # inside <label class="zoom">: whether its checkbox came first
        self.strong_text = None
        self.scripts = 0

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)
        if tag == "script":
            self.scripts += 1
        if "id" in attributes:
            self.ids.add(attributes["id"])
        for key in ("href", "src"):
            if key in attributes:
                self.references.append(attributes[key])
        if tag == "a":
            self.open_link = attributes.get("href")
        if tag == "label" and "zoom" in attributes.get("class", "").split():
            self.zoom_label = False
        if tag == "input" and self.zoom_label is not None and attributes.get("type") == "checkbox":
            self.zoom_label = True
        if tag == "img":
            # (inside a link, source, a thumbnail, enlarged by a click: inside a zoom label after its checkbox)
            self.thumbnails.append((self.open_link, attributes["src"], "thumb" in attributes.get("class", ""),
                                    self.zoom_label is True))
        if tag == "tr" and "case" in attributes.get("class", "").split():
            self.case, self.organ = attributes["data-case"], None
            self.case_order.append((attributes["data-case"], attributes["id"]))
        if tag == "tr" and "data-organ" in attributes:
            self.organ = attributes["data-organ"]
        if tag == "strong" and self.case is not None:
            self.strong_text = ""
        if tag == "span" and "swatch" in attributes.get("class", ""):
            self.swatches.setdefault(self.organ, set()).add(attributes["style"].split("background:")[1])
        if tag == "td" and "data-metric" in attributes:
            self.open_cell = (self.case, self.organ, attributes["data-metric"])
            self.cells[self.open_cell] = {"title": attributes.get("title"), "text": "",
                                          "class": attributes.get("class")}
        if tag == "span" and "data-stat" in attributes:
            self.open_stat = (self.organ, self.open_cell[2], attributes["data-stat"])
            self.summary_stats[self.open_stat] = {"title": attributes.get("title"), "text": ""}

    def handle_endtag(self, tag):
        if tag in VOID_ELEMENTS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "td":
            self.open_cell = None
        if tag == "span":
            self.open_stat = None
        if tag == "a":
            self.open_link = None
        if tag == "label":
            self.zoom_label = None
        if tag == "strong" and self.strong_text is not None and self.case is not None:
            self.case_ids_shown.append(self.strong_text.split(". ", 1)[1])  # "rank. case id"
            self.strong_text = None

    def handle_data(self, data):
        if self.open_cell is not None:
            self.cells[self.open_cell]["text"] += data
        if self.open_stat is not None:
            self.summary_stats[self.open_stat]["text"] += data
        if self.strong_text is not None:
            self.strong_text += data


def read_report(path: Path) -> ReportReader:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    reader = ReportReader()
    reader.feed(text)
    reader.close()
    assert reader.errors == [] and reader.stack == [], (reader.errors, reader.stack)
    return reader


PNG_URI = "data:image/png;base64,"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embedded_png(source: str) -> bytes:
    assert source.startswith(PNG_URI), source[:40]
    data = base64.b64decode(source[len(PNG_URI):], validate=True)
    assert data[:8] == PNG_MAGIC
    return data


def assert_self_contained(reader: ReportReader, out_dir: Path, text: str) -> None:
    assert reader.scripts == 0
    assert "://" not in text and "url(" not in text and "@import" not in text
    for reference in reader.references:
        if reference.startswith("#"):
            assert reference[1:] in reader.ids, reference
        elif reference.startswith("data:"):
            embedded_png(reference)
        else:
            assert not reference.startswith(("/", "//")), reference
            assert (out_dir / unquote(reference)).is_file(), reference
    for link, source, is_thumbnail, zooms in reader.thumbnails:
        embedded_png(source)
        assert link is None and is_thumbnail and zooms  # a thumbnail a click enlarges, not a link that can break


def shown_figures(reader: ReportReader) -> list[bytes]:
    return [embedded_png(source) for _, source, _, _ in reader.thumbnails]


# ----------------------------------------------------------------------------- tests

def test_report_with_labels_matches_metrics_and_summary(tmp_path):
    out_dir, cases, summary = make_run(tmp_path)
    boxplot = Path(write_png(out_dir / "figures" / "dice_boxplot.png")).relative_to(out_dir)
    path = write_report(out_dir, cases, summary, CLASS_NAMES, title="Test run", run_figures=[boxplot])
    assert path == out_dir / "report.html"
    reader = read_report(path)
    assert_self_contained(reader, out_dir, path.read_text(encoding="utf-8"))

    # every output of every case is linked, and every figure shown
    references = {unquote(r) for r in reader.references}
    for case in cases:
        assert case["prediction_path"] in references
        assert any(r.endswith(Path(case["uncertainty_path"]).name) for r in references)
        assert any(r.endswith(Path(case["image_path"]).name) and r.startswith("../input/") for r in references)
    shown = shown_figures(reader)
    for case in cases:
        for figure in case["figures"]:
            assert (out_dir / figure).read_bytes() in shown, figure
    assert (out_dir / boxplot).read_bytes() in shown
    assert len(shown) == sum(len(case["figures"]) for case in cases) + 1
    assert not any(r.endswith(".png") for r in references)  # figures are embedded, not linked

    # worst first; case ids escaped in the markup and shown as they are
    assert [case_id for case_id, _ in reader.case_order] == EXPECTED_ORDER
    assert reader.case_ids_shown == EXPECTED_ORDER
    assert "Case_&lt;006&gt;&amp;_Week2" in path.read_text(encoding="utf-8")

    # per case and organ: the numbers of metrics.csv
    table = read_metrics_csv(out_dir / "metrics.csv")
    for case_id in DICE:
        for name in FOREGROUND:
            for metric in ("dice", "hd95", "gt_volume_ml", "pred_volume_ml", "uncertainty"):
                written, cell = table[(case_id, name)][metric], reader.cells[(case_id, name, metric)]
                if written == "nan":
                    assert cell["text"] == MISSING and cell["title"] is None
                else:
                    assert cell["title"] == written
                    assert cell["text"] == f"{float(written):.{DIGITS[metric]}f}"
    assert reader.cells[("Case_<006>&_Week2", "prostate", "dice")]["text"] == "0.000"  # a miss is a 0, not n/a

    # per organ: the numbers of summary.json
    saved = json.loads((out_dir / "summary.json").read_text())
    for name in FOREGROUND:
        for key, metric, stat in (("per_class_dice", "dice", "mean"), ("per_class_dice_std", "dice", "std"),
                                  ("per_class_hd95", "hd95", "mean")):
            shown = reader.summary_stats[(name, metric, stat)]
            assert shown["title"] == f"{saved[key][name]:.6g}"
            assert shown["text"] == f"{saved[key][name]:.{DIGITS[metric]}f}"
        assert reader.cells[(None, name, "misses")]["text"] == str(saved["per_class_misses"][name])
        flagged = sum(flag["organ"] == name for flag in saved["flagged"])
        assert reader.cells[(None, name, "flagged")]["text"] == str(flagged)
    # HD95 std is not in summary.json: computed from the cases, population std over finite values
    bone_hd95 = [case["metrics"]["bone"]["hd95"] for case in cases]
    assert reader.summary_stats[("bone", "hd95", "std")]["title"] == f"{np.std(bone_hd95):.6g}"

    # colours of the figures, for every organ everywhere it is named
    colours = class_colours(len(CLASS_NAMES))
    for c, name in enumerate(FOREGROUND, start=1):
        assert reader.swatches[name] == {colours[c]}

    # the flags: the flagged cases are listed and linked to their rows
    anchors = dict(reader.case_order)
    assert f'href="#{anchors["Case_005_Week1"]}"' in path.read_text(encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    assert "bladder 0.412 &gt; 0.300" in text and "prostate not predicted" in text
    assert text.count('class="flag"') == 2
    highlighted = [key for key, cell in reader.cells.items() if cell["class"] == "flagged"]
    assert highlighted == [("Case_005_Week1", "bladder", "uncertainty"),
                           ("Case_<006>&_Week2", "prostate", "uncertainty")]


def test_misses_are_counted_from_the_volumes_when_the_summary_lacks_them(tmp_path):
    out_dir, cases, summary = make_run(tmp_path)
    expected = summary.pop("per_class_misses")
    reader = read_report(write_report(out_dir, cases, summary, CLASS_NAMES))
    for name in FOREGROUND:
        assert reader.cells[(None, name, "misses")]["text"] == str(expected[name])


def test_report_without_labels_shows_volumes_and_uncertainty(tmp_path):
    out_dir, cases, _ = make_run(tmp_path, labelled=False)
    path = write_report(out_dir, cases, None, CLASS_NAMES)
    reader = read_report(path)
    text = path.read_text(encoding="utf-8")
    assert_self_contained(reader, out_dir, text)
    assert "Dice" not in text and "HD95" not in text and "summary.json" not in text

    largest = {case["case_id"]: np.nanmax([case["metrics"][n]["uncertainty"] for n in FOREGROUND]) for case in cases}
    assert [case_id for case_id, _ in reader.case_order] == sorted(largest, key=lambda k: -largest[k])
    table = read_metrics_csv(out_dir / "metrics.csv")
    for case_id in DICE:
        for name in FOREGROUND:
            for metric in ("pred_volume_ml", "uncertainty"):
                written, cell = table[(case_id, name)][metric], reader.cells[(case_id, name, metric)]
                assert cell["text"] == (MISSING if written == "nan" else f"{float(written):.{DIGITS[metric]}f}")
                assert cell["title"] == (None if written == "nan" else written)
            assert (case_id, name, "dice") not in reader.cells
    for name in FOREGROUND:
        volumes = [case["metrics"][name]["pred_volume_ml"] for case in cases]
        assert reader.cells[(None, name, "pred_volume_ml")]["title"] == f"{np.mean(volumes):.6g}"


def test_missing_figures_are_not_referenced(tmp_path, caplog):
    out_dir, cases, summary = make_run(tmp_path)
    (out_dir / cases[0]["figures"][0]).unlink()
    path = write_report(out_dir, cases, summary, CLASS_NAMES)
    assert_self_contained(read_report(path), out_dir, path.read_text(encoding="utf-8"))
    assert "does not exist" in caplog.text


@pytest.mark.parametrize("labelled", [True, False])
def test_every_case_row_has_its_flag_state(tmp_path, labelled):
    out_dir, cases, summary = make_run(tmp_path, labelled)
    text = write_report(out_dir, cases, summary, CLASS_NAMES).read_text(encoding="utf-8")
    assert text.count('class="flag"') == len(FLAGS) and text.count('class="clear"') == len(DICE) - len(FLAGS)


def test_report_copied_alone_still_shows_every_figure(tmp_path):
    out_dir, cases, summary = make_run(tmp_path)
    path = write_report(out_dir, cases, summary, CLASS_NAMES)
    elsewhere = tmp_path / "mailed"
    elsewhere.mkdir()
    copy = Path(shutil.copy(path, elsewhere / "report.html"))
    reader = read_report(copy)
    sources = [source for _, source, _, _ in reader.thumbnails]
    assert len(sources) == sum(len(case["figures"]) for case in cases)
    for source in sources:
        assert source.startswith("data:")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_MAGIC
    assert {embedded_png(s) for s in sources} == {(out_dir / f).read_bytes() for case in cases for f in case["figures"]}


def test_rtstruct_and_seg_of_a_case_are_linked(tmp_path):
    out_dir, cases, summary = make_run(tmp_path)
    for case in cases[:2]:  # as predict.py puts them in a case's entry: names in out_dir
        (out_dir / f"{case['case_id']}_rtstruct.dcm").write_bytes(b"\0" * 128 + b"DICM")
        case["rtstruct_path"] = f"{case['case_id']}_rtstruct.dcm"
    seg = out_dir / f"{cases[0]['case_id']}_seg.dcm"
    seg.write_bytes(b"\0" * 128 + b"DICM")
    cases[0]["seg_path"] = str(seg)  # absolute also works
    path = write_report(out_dir, cases, summary, CLASS_NAMES)
    reader = read_report(path)
    assert_self_contained(reader, out_dir, path.read_text(encoding="utf-8"))
    references = [unquote(r) for r in reader.references]
    for case in cases:
        rtstruct, seg = f"{case['case_id']}_rtstruct.dcm", f"{case['case_id']}_seg.dcm"
        assert (rtstruct in references) == ("rtstruct_path" in case)
        assert (seg in references) == ("seg_path" in case)
    text = path.read_text(encoding="utf-8")
    assert text.count("RTSTRUCT: <a ") == 2 and text.count("DICOM-SEG: <a ") == 1


def test_the_held_out_flag_rate_stands_beside_the_flag_count(tmp_path):
    out_dir, cases, summary = make_run(tmp_path)
    rule = {"held_out": {"held_out": "patient", "n_volumes": 6, "n_flagged_volumes": 2, "n_organs": 30,
                         "n_flagged_organs": 3, "flagged": []}}
    text = write_report(out_dir, cases, summary, CLASS_NAMES, review_rule=rule).read_text(encoding="utf-8")
    assert ("On validation patients it was not fitted on, the rule flags 2 of 6 volume(s) (3 of 30 organs)."
            in text)
    # no rule, or one without a held-out rate (one validation patient): no such line
    for no_rate in (None, {"held_out": None}):
        text = write_report(out_dir, cases, summary, CLASS_NAMES, review_rule=no_rate).read_text(encoding="utf-8")
        assert "it was not fitted on" not in text
