"""longitudinal.py and predict.py's output over the weeks: longitudinal.csv against the voxel counts
of the written predictions, the report's per-patient sections, the volume-change flag on
hand-made labels, and --patient-of on names that are not HipMRI's.

predict.py runs in-process on tiny volumes (24 x 20 x 16) with an untrained network of seeded
random weights: what is checked here is the bookkeeping from the written labels to the CSV and
the page, which holds for any prediction; every expected number is computed in the test from the
files predict.py wrote (volumes from the NIfTI affine: |det| / 1000 ml per voxel).
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

import predict  # noqa: E402
from pelvicseg.checkpoint import save_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from conftest import AFFINE, SHAPE, synthetic_case, write_case, write_nifti  # noqa: E402
from dataset import CLASS_NAMES, Case, find_cases  # noqa: E402
from pelvicseg.longitudinal import COLUMNS, longitudinal_rows, patient_weeks, write_longitudinal  # noqa: E402
from modules import ImprovedUNet3D  # noqa: E402
from pelvicseg.report import write_report  # noqa: E402

ORGANS = CLASS_NAMES[1:]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers

def predict_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def voxel_ml(image: nib.Nifti1Image) -> float:
    return abs(np.linalg.det(image.affine[:3, :3])) / 1000.0


def expected_rows(out: Path, weeks_of: dict[str, tuple[str, int]], labels: dict[str, str | None],
                  threshold: float) -> dict[tuple[str, str], dict]:
    """{(case, organ): volume, change, fraction, flag, Dice} from the *_pred.nii.gz files alone."""
    volumes, dice = {}, {}
    for case_id in weeks_of:
        image = nib.load(out / f"{case_id}_pred.nii.gz")
        predicted = np.asanyarray(image.dataobj)
        target = np.asanyarray(nib.load(labels[case_id]).dataobj) if labels.get(case_id) else None
        for c, organ in enumerate(ORGANS, start=1):
            volumes[case_id, organ] = int((predicted == c).sum()) * voxel_ml(image)
            if target is not None:
                total = (predicted == c).sum() + (target == c).sum()
                dice[case_id, organ] = 2.0 * ((predicted == c) & (target == c)).sum() / total if total else math.nan
    expected = {}
    for case_id, (patient, week) in weeks_of.items():
        first = min((w, c) for c, (p, w) in weeks_of.items() if p == patient)[1]
        for organ in ORGANS:
            volume, reference = volumes[case_id, organ], volumes[first, organ]
            fraction = (volume - reference) / reference if reference else (math.inf if volume else 0.0)
            expected[case_id, organ] = {"patient": patient, "week": week, "volume_ml": volume,
                                        "change_ml": volume - reference, "change_fraction": fraction,
                                        "flagged": abs(fraction) > threshold, "dice": dice.get((case_id, organ))}
    return expected


class PatientSections(HTMLParser):
    """report.html's per-patient sections: {patient: {"cases": {case: {organ: {metric: text,
    "flagged": bool}}}, "images": [src, ...], "text": str}}."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.patient = self.case = self.organ = self.metric = None
        self.depth = 0

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "section" and "data-patient" in attributes:
            self.patient = attributes["data-patient"]
            self.sections[self.patient] = {"cases": {}, "images": [], "text": ""}
        if self.patient is None:
            return
        section = self.sections[self.patient]
        if tag == "img":
            section["images"].append(attributes.get("src", ""))
        elif tag == "tr" and "data-case" in attributes:
            self.case = attributes["data-case"]
            section["cases"][self.case] = {}
        elif tag == "td" and "data-organ" in attributes and self.case:
            self.organ = attributes["data-organ"]
            section["cases"][self.case][self.organ] = {"flagged": "flagged" in (attributes.get("class") or "")}
        elif tag == "span" and "data-metric" in attributes and self.organ:
            self.metric = attributes["data-metric"]
            section["cases"][self.case][self.organ][self.metric] = ""

    def handle_endtag(self, tag):
        if tag == "section":
            self.patient = self.case = self.organ = None
        elif tag == "tr":
            self.case = self.organ = None
        elif tag == "td":
            self.organ = None
        elif tag == "span":
            self.metric = None

    def handle_data(self, data):
        if self.patient is None:
            return
        self.sections[self.patient]["text"] += data
        if self.metric:
            self.sections[self.patient]["cases"][self.case][self.organ][self.metric] += data


def read_sections(path: Path) -> tuple[dict[str, dict], str]:
    text = path.read_text(encoding="utf-8")
    reader = PatientSections()
    reader.feed(text)
    return reader.sections, text


def shown_change(fraction: float) -> str:
    """As the page writes a change: a signed percentage with one decimal, 'new' from nothing."""
    return "new" if math.isinf(fraction) else f"{fraction * 100:+.1f} %"


def assert_one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("error:"), line
    return line


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained network of seeded random weights whose spacing is the test volumes' own (one
    sliding window covers a volume): a real checkpoint for predict.py, written in milliseconds."""
    torch.manual_seed(0)
    model_args = {"in_channels": 1, "out_channels": len(CLASS_NAMES), "channels": [4, 8, 8, 8]}
    spacing = [float(s) for s in np.abs(np.diag(AFFINE)[:3])]
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint({"model": ImprovedUNet3D(**model_args).state_dict(), "model_args": model_args,
                     "class_names": list(CLASS_NAMES), "config": {"spacing": spacing, "roi_size": [32, 32, 16],
                                                                  "class_names": list(CLASS_NAMES)}}, path)
    return path


@pytest.fixture(scope="module")
def hipmri_run(checkpoint, tmp_path_factory) -> dict:
    """HipMRI names: patient 004 in weeks 0, 1 and 3 (week 2 missed), patient 005 in week 0 only."""
    base = tmp_path_factory.mktemp("longitudinal")
    data = base / "data"
    for patient, week in ((4, 0), (4, 1), (4, 3), (5, 0)):
        write_case(data, patient, week)
    out = base / "out"
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(checkpoint), "--data-root", str(data),
                                                   "--split", "all", "--out", str(out), "--device", "cpu",
                                                   "--no-figures", "--no-hd95", "--volume-change", "0.02"]))
    assert code == 0
    cases = find_cases(data)
    weeks_of = {"Case_004_Week0": ("004", 0), "Case_004_Week1": ("004", 1), "Case_004_Week3": ("004", 3),
                "Case_005_Week0": ("005", 0)}
    assert sorted(c.case_id for c in cases) == sorted(weeks_of)
    expected = expected_rows(out, weeks_of, {c.case_id: c.label for c in cases}, threshold=0.02)
    # the untrained network's volumes move by 0.4 % to 7 % between weeks: 2 % leaves some flagged, some not
    assert {v["flagged"] for k, v in expected.items() if k[0] != "Case_004_Week0" and v["volume_ml"]} == {True, False}
    return {"out": out, "expected": expected, "weeks_of": weeks_of}


# ----------------------------------------------------------------------------- the CSV and summary.json

def test_longitudinal_csv_volumes_are_the_written_predictions_voxel_counts(hipmri_run):
    out, expected = hipmri_run["out"], hipmri_run["expected"]
    header, rows = read_csv(out / "longitudinal.csv")
    assert header == list(COLUMNS)
    assert len(rows) == len(hipmri_run["weeks_of"]) * len(ORGANS)  # background left out
    assert not any(r["organ"] == "background" for r in rows)
    # patient, then week, then the classes' order
    assert [(r["patient"], int(r["week"]), r["organ"]) for r in rows] == sorted(
        ((r["patient"], int(r["week"]), r["organ"]) for r in rows), key=lambda k: (k[0], k[1], ORGANS.index(k[2])))
    assert any(value["volume_ml"] > 0 for value in expected.values())  # something predicted: not 0 == 0
    for row in rows:
        want = expected[row["case"], row["organ"]]
        assert (row["patient"], int(row["week"])) == (want["patient"], want["week"])
        assert float(row["volume_ml"]) == pytest.approx(want["volume_ml"], rel=1e-5, abs=1e-9)
        assert float(row["change_ml"]) == pytest.approx(want["change_ml"], rel=1e-4, abs=1e-4)
        if math.isinf(want["change_fraction"]):
            assert float(row["change_fraction"]) == math.inf
        else:
            assert float(row["change_fraction"]) == pytest.approx(want["change_fraction"], rel=1e-4, abs=1e-6)
        assert int(row["flagged"]) == int(want["flagged"])
        if want["dice"] is None or math.isnan(want["dice"]):
            assert row["dice"] in ("nan", "") and (want["dice"] is None) == (row["dice"] == "")
        else:
            assert float(row["dice"]) == pytest.approx(want["dice"], rel=1e-5)
    # the patient of one week: its rows are there, its change nothing
    single = [r for r in rows if r["patient"] == "005"]
    assert len(single) == len(ORGANS) and all(float(r["change_ml"]) == 0 and r["flagged"] == "0" for r in single)
    first_week = [r for r in rows if r["case"] == "Case_004_Week0"]
    assert all(float(r["change_fraction"]) == 0 for r in first_week)

    summary = json.loads((out / "summary.json").read_text())["longitudinal"]
    assert summary["csv"] == "longitudinal.csv" and summary["volume_change"] == 0.02 and summary["patients"] == 2
    assert sorted((f["case"], f["organ"]) for f in summary["flagged"]) == sorted(
        key for key, value in expected.items() if value["flagged"])


def test_report_section_per_patient_shows_the_volumes_and_changes(hipmri_run):
    out, expected = hipmri_run["out"], hipmri_run["expected"]
    sections, text = read_sections(out / "report.html")
    assert sorted(sections) == ["004", "005"]
    for patient, section in sections.items():
        cases = [c for c, (p, _) in hipmri_run["weeks_of"].items() if p == patient]
        assert list(section["cases"]) == cases  # the weeks in order
        for case_id in cases:
            shown = section["cases"][case_id]
            assert list(shown) == list(ORGANS)
            for organ in ORGANS:
                want = expected[case_id, organ]
                assert shown[organ]["volume_ml"] == f"{want['volume_ml']:.2f}", (case_id, organ)
                assert shown[organ]["change_fraction"] == shown_change(want["change_fraction"]), (case_id, organ)
                assert shown[organ]["flagged"] == want["flagged"], (case_id, organ)
        assert section["images"] == []  # --no-figures: no figure, as for the cases
    assert re.search(r'data-threshold="0.02">2 %<', text), "the threshold is not stated"
    assert "Patient 004: 3 week(s)" in sections["004"]["text"] and "Patient 005: 1 week(s)" in sections["005"]["text"]


# ----------------------------------------------------------------------------- the flag, on hand-made labels

def hand_made_run(tmp_path: Path) -> tuple[list[dict], dict, float]:
    """Three weeks of one patient as label arrays with known voxel counts, and the results
    predict.py would make of them (volumes from the arrays and the affine, no Dice)."""
    counts = {  # voxels per organ and week; week 0 is the reference
        0: {"bladder": 100, "rectum": 50, "prostate": 0},
        1: {"bladder": 140, "rectum": 60, "prostate": 0},   # bladder +40 % (flag), rectum +20 % (no flag)
        2: {"bladder": 71, "rectum": 30, "prostate": 5},    # bladder -29 % (no flag), rectum -40 % (flag), new prostate
    }
    affine = np.diag([-2.0, -1.5, 3.0, 1.0])
    ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    results = []
    for week, organs in counts.items():
        labels = np.zeros((20, 20, 10), dtype=np.uint8)
        flat = labels.reshape(-1)
        start = 0
        for organ, count in organs.items():
            flat[start:start + count] = CLASS_NAMES.index(organ)
            start += count
        path = write_nifti(tmp_path / f"Case_009_Week{week}.nii.gz", labels, affine)
        volume = {name: float((labels == c).sum()) * ml for c, name in enumerate(CLASS_NAMES)}
        case = Case(str(path), None, f"Case_009_Week{week}", "009", week)
        results.append({"case": case, "rows": [{"class": name, "pred_volume_ml": volume[name]}
                                               for name in CLASS_NAMES]})
    return results, counts, ml


def test_a_week_past_the_volume_change_is_flagged_and_one_within_it_is_not(tmp_path):
    results, counts, ml = hand_made_run(tmp_path)
    rows = longitudinal_rows(results, CLASS_NAMES, patient_weeks([r["case"] for r in results]), volume_change=0.3)
    got = {(r["week"], r["organ"]): r for r in rows}
    assert len(rows) == 3 * len(ORGANS)
    flagged = {key for key, r in got.items() if r["flagged"]}
    assert flagged == {(1, "bladder"), (2, "rectum"), (2, "prostate")}
    assert got[1, "bladder"]["change_fraction"] == pytest.approx(0.4)
    assert got[1, "rectum"]["change_fraction"] == pytest.approx(0.2)
    assert got[2, "bladder"]["change_fraction"] == pytest.approx(-0.29)
    assert got[2, "rectum"]["change_fraction"] == pytest.approx(-0.4)
    assert got[2, "bladder"]["change_ml"] == pytest.approx((71 - 100) * ml)
    assert got[2, "prostate"]["change_fraction"] == math.inf  # none in week 0: new
    assert got[1, "prostate"]["change_fraction"] == 0 and not got[1, "prostate"]["flagged"]  # none, still none
    assert all(r["dice"] == "" for r in rows)  # no labels
    # a looser threshold keeps the 40 % changes, a stricter one flags the 20 % and 29 % too
    looser = longitudinal_rows(results, CLASS_NAMES, patient_weeks([r["case"] for r in results]), volume_change=0.5)
    assert {(r["week"], r["organ"]) for r in looser if r["flagged"]} == {(2, "prostate")}
    stricter = longitudinal_rows(results, CLASS_NAMES, patient_weeks([r["case"] for r in results]), volume_change=0.1)
    assert {(1, "rectum"), (2, "bladder")} <= {(r["week"], r["organ"]) for r in stricter if r["flagged"]}


def test_report_embeds_the_patients_figure_and_highlights_its_flagged_weeks(tmp_path):
    results, counts, ml = hand_made_run(tmp_path / "labels")
    out = tmp_path / "out"
    out.mkdir()
    longitudinal = write_longitudinal(out, results, CLASS_NAMES, patient_weeks([r["case"] for r in results]),
                                      volume_change=0.3, figures=True)
    figure = out / "figures" / "longitudinal_009.png"
    assert longitudinal["figures"] == {"009": "figures/longitudinal_009.png"}
    assert figure.read_bytes().startswith(PNG_MAGIC)
    cases = [{"case_id": r["case"].case_id, "prediction_path": r["case"].image, "flags": [],
              "metrics": {row["class"]: row for row in r["rows"]}} for r in results]
    write_report(out, cases, None, CLASS_NAMES, longitudinal=longitudinal)
    sections, _ = read_sections(out / "report.html")
    (source,) = sections["009"]["images"]
    assert base64.b64decode(source.split(",", 1)[1]) == figure.read_bytes()  # embedded, not linked
    shown = sections["009"]["cases"]
    highlighted = {(case_id, organ) for case_id, organs in shown.items() for organ, cell in organs.items()
                   if cell["flagged"]}
    assert highlighted == {("Case_009_Week1", "bladder"), ("Case_009_Week2", "rectum"),
                           ("Case_009_Week2", "prostate")}
    assert shown["Case_009_Week2"]["bladder"]["volume_ml"] == f"{71 * ml:.2f}"
    assert shown["Case_009_Week2"]["bladder"]["change_fraction"] == "-29.0 %"
    assert shown["Case_009_Week2"]["prostate"]["change_fraction"] == "new"


# ----------------------------------------------------------------------------- names: HipMRI's and --patient-of

def test_hipmri_names_give_patient_and_week_and_other_names_none(tmp_path):
    root = tmp_path / "course"
    write_case(root, 12, 4, layout="course")
    write_case(root, 7, 0, layout="public")
    other = Case(str(tmp_path / "scan.nii.gz"), None, "scan", "", 0)
    # one scan per patient and week: parsed by dataset.py, carried by Case
    assert patient_weeks(find_cases(root) + [other]) == {"Case_007_Week0": ("007", 0), "K012_Week4": ("012", 4)}
    assert patient_weeks([other]) == {}


def unlabelled_folder(folder: Path, names: list[str]) -> Path:
    for seed, name in enumerate(names):
        image, _ = synthetic_case(SHAPE, seed=seed)
        write_nifti(folder / f"{name}.nii.gz", image)
    return folder


def test_patient_of_groups_names_that_are_not_hipmri(checkpoint, tmp_path, capsys):
    scans = unlabelled_folder(tmp_path / "scans", ["pat-A_scan1", "pat-A_scan10", "pat-A_scan2", "pat-B_scan3"])
    common = ["--checkpoint", str(checkpoint), "--input", str(scans), "--device", "cpu", "--no-figures"]
    # without a week group: numbered 0, 1, ... in case-id order, numbers compared as numbers
    code, stdout, stderr = predict_in_process([*common, "--out", str(tmp_path / "numbered"), "--patient-of",
                                               r"(?P<patient>pat-\w)_scan"], capsys)
    assert code == 0, stdout + stderr
    _, rows = read_csv(tmp_path / "numbered" / "longitudinal.csv")
    weeks = {r["case"]: (r["patient"], int(r["week"])) for r in rows}
    assert weeks == {"pat-A_scan1": ("pat-A", 0), "pat-A_scan2": ("pat-A", 1), "pat-A_scan10": ("pat-A", 2),
                     "pat-B_scan3": ("pat-B", 0)}
    assert all(r["dice"] == "" for r in rows)  # no labels
    expected = expected_rows(tmp_path / "numbered", weeks, {}, threshold=0.3)
    for row in rows:
        assert float(row["volume_ml"]) == pytest.approx(expected[row["case"], row["organ"]]["volume_ml"], rel=1e-5)
    # with a week group: its numbers
    code, stdout, stderr = predict_in_process([*common, "--out", str(tmp_path / "weeks"), "--patient-of",
                                               r"(?P<patient>pat-\w)_scan(?P<week>\d+)"], capsys)
    assert code == 0, stdout + stderr
    _, rows = read_csv(tmp_path / "weeks" / "longitudinal.csv")
    assert {r["case"]: (r["patient"], int(r["week"])) for r in rows} == {
        "pat-A_scan1": ("pat-A", 1), "pat-A_scan2": ("pat-A", 2), "pat-A_scan10": ("pat-A", 10),
        "pat-B_scan3": ("pat-B", 3)}
    pat_a = {(r["week"], r["organ"]): float(r["change_ml"]) for r in rows if r["patient"] == "pat-A"}
    assert all(pat_a["1", organ] == 0 for organ in ORGANS)  # the lowest week is the reference
    assert json.loads((tmp_path / "weeks" / "summary.json").read_text())["longitudinal"]["volume_change"] == 0.3
    # without --patient-of these names group nothing: no longitudinal.csv, and summary.json says why
    code, stdout, stderr = predict_in_process([*common, "--out", str(tmp_path / "plain")], capsys)
    assert code == 0, stdout + stderr
    assert not (tmp_path / "plain" / "longitudinal.csv").exists()
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())["longitudinal"]
    assert summary["csv"] is None and summary["patients"] == 0 and "--patient-of" in summary["reason"]
    assert 'id="patients"' not in (tmp_path / "plain" / "report.html").read_text()


@pytest.mark.parametrize("pattern, words", [
    (r"(?P<patient>pat-\w)_scan", ["other_image", r"(?P<patient>pat-\w)_scan", "does not match"]),
    (r"(?P<patient>pat-\w", ["not a regular expression"]),
    (r"pat-\w_scan(?P<week>\d+)", ["(?P<patient>...)"]),
    (r"(?P<patient>[a-z]+)_(?P<week>\w+)", ["other_image", "week 'image'", "not a whole number"]),
], ids=["misses-a-case", "not-a-regex", "no-patient-group", "week-not-a-number"])
def test_a_patient_of_that_does_not_fit_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, pattern, words):
    scans = unlabelled_folder(tmp_path / "scans", ["pat-A_scan1", "pat-A_scan2", "other_image"])
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(checkpoint), "--input", str(scans), "--out",
                                               str(out), "--device", "cpu", "--patient-of", pattern], capsys)
    line = assert_one_line_error(code, stderr)
    for word in words:
        assert word in line, line
    assert not out.exists()
