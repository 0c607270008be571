"""Each patient over the weeks: a prediction run's cases grouped by patient, and each organ's
predicted volume followed week by week against that patient's first week.

HipMRI scans every patient weekly (Week0 before treatment, later weeks during it), so the same
organs are segmented several times. A week whose organ volume differs much from the first week's
is worth a look: the bladder fills and empties, the rectum carries gas, but a prostate that
halves in a week is more often a segmentation error than anatomy.

Cases are grouped by the patient and week dataset.py parsed from HipMRI names (``Case``
carries them), or by a user's regular expression (predict.py's ``--patient-of``) searched in the
case ids. ``patient_weeks`` runs before anything is written, so a pattern that misses a case
stops the run with one line; ``write_longitudinal`` writes ``longitudinal.csv`` and the
per-patient figures once the cases are predicted.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path

from dataset import Case
from pelvicseg.errors import DataError
from pelvicseg.metrics import write_rows

LONGITUDINAL_CSV = "longitudinal.csv"
VOLUME_CHANGE = 0.3  # a fraction of the first week's volume
COLUMNS = ("patient", "week", "case", "organ", "volume_ml", "change_ml", "change_fraction", "dice", "flagged")


def volume_change_fraction(text: str) -> float:
    """--volume-change: a fraction of the first week's volume, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a fraction of the first week's volume, 0 or more "
                                         "(0.3 flags changes above 30 %)")
    return value


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise DataError(f"--patient-of '{pattern}': not a regular expression ({error})") from None
    if "patient" not in compiled.groupindex:
        raise DataError(f"--patient-of '{pattern}': has no named group (?P<patient>...) to take the patient from")
    return compiled


def patient_and_week(case: Case, pattern: re.Pattern | None = None) -> tuple[str, int | None] | None:
    """(patient, week) of one case; None where it has none.

    Without ``pattern``: the patient and week dataset.py parsed from the HipMRI file name
    (``Case_004_Week0`` -> ("004", 0)); None for other names (a DICOM series, ``scan.nii.gz``).
    With ``pattern``: its ``patient`` group and, where the pattern has one, its ``week`` group (a
    whole number), searched in the case id; the week is None without a week group (the caller
    numbers such cases); None where the pattern does not match or the patient group is empty."""
    if pattern is None:
        return (case.patient, case.week) if case.patient else None
    match = pattern.search(case.case_id)
    if match is None or not match["patient"]:
        return None
    if "week" not in pattern.groupindex:
        return match["patient"], None
    week = match["week"]
    if week is None or not (week.isascii() and week.isdigit()):
        raise DataError(f"{case.case_id}: --patient-of '{pattern.pattern}' takes week {week!r} from it, which is "
                        "not a whole number")
    return match["patient"], int(week)


def natural_key(text: str) -> list:
    """Numbers inside a name compared as numbers: scan2 before scan10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def patient_weeks(cases: Sequence[Case], pattern: str | None = None) -> dict[str, tuple[str, int]]:
    """{case id: (patient, week)} for the cases that belong to a patient, in patient then week
    order. Checked before anything is written: with ``pattern`` every case must match it (one
    line naming the first that does not, and the pattern), and no two cases of a patient may share
    a week; without a week group a patient's cases are numbered 0, 1, ... in case-id order."""
    compiled = compile_pattern(pattern) if pattern is not None else None
    found: dict[str, tuple[str, int | None]] = {}
    for case in cases:
        key = patient_and_week(case, compiled)
        if key is None and compiled is not None:
            raise DataError(f"{case.case_id}: does not match --patient-of '{pattern}' (a named group "
                            "(?P<patient>...) must match a non-empty part of every case id)")
        if key is not None:
            found[case.case_id] = key
    if compiled is not None and "week" not in compiled.groupindex:
        by_patient: dict[str, list[str]] = {}
        for case_id, (patient, _) in found.items():
            by_patient.setdefault(patient, []).append(case_id)
        found = {case_id: (patient, week) for patient, case_ids in by_patient.items()
                 for week, case_id in enumerate(sorted(case_ids, key=natural_key))}
    owners: dict[tuple[str, int], str] = {}
    for case_id, key in found.items():
        first = owners.setdefault(key, case_id)
        if first != case_id:
            raise DataError(f"{case_id}: patient {key[0]} week {key[1]} again (first: {first}); "
                            + (f"--patient-of '{pattern}' must tell every case of a patient apart" if pattern
                               else "one scan per patient and week"))
    return dict(sorted(found.items(), key=lambda item: (natural_key(item[1][0]), item[1][1], item[0])))


def longitudinal_rows(results: Sequence[dict], class_names: Sequence[str], weeks: dict[str, tuple[str, int]],
                      volume_change: float = VOLUME_CHANGE) -> list[dict]:
    """One row per patient, week and organ (background left out): the predicted volume, its change
    against the patient's first (lowest) week in ml and as a fraction of that week's volume, the
    Dice where the case has labels (empty otherwise), and ``flagged`` 1 where the fraction's size
    exceeds ``volume_change``. ``results``: predict.py's per-case results (``case`` and its
    metrics ``rows``); ``weeks``: ``patient_weeks``'s. An organ absent in the first week has
    change_fraction inf where it is predicted later (flagged) and 0 where it is still absent."""
    by_case = {r["case"].case_id: {row["class"]: row for row in r["rows"]} for r in results}
    patients: dict[str, list[tuple[int, str]]] = {}
    for case_id, (patient, week) in weeks.items():
        if case_id in by_case:
            patients.setdefault(patient, []).append((week, case_id))
    rows = []
    for patient, visits in patients.items():
        visits.sort()
        first = by_case[visits[0][1]]
        for week, case_id in visits:
            for organ in class_names[1:]:
                row = by_case[case_id][organ]
                volume, reference = float(row["pred_volume_ml"]), float(first[organ]["pred_volume_ml"])
                change = volume - reference
                fraction = change / reference if reference > 0 else (math.inf if volume > 0 else 0.0)
                rows.append({"patient": patient, "week": week, "case": case_id, "organ": organ, "volume_ml": volume,
                             "change_ml": change, "change_fraction": fraction,
                             "dice": float(row["dice"]) if "dice" in row else "",
                             "flagged": int(abs(fraction) > volume_change)})
    return rows


def write_longitudinal(out: Path, results: Sequence[dict], class_names: Sequence[str],
                       weeks: dict[str, tuple[str, int]], volume_change: float = VOLUME_CHANGE,
                       figures: bool = True) -> dict:
    """``out/longitudinal.csv`` (whenever some case belongs to a patient, a patient of one week
    included) and, with ``figures``, ``figures/longitudinal_<patient>.png`` for each patient of two
    weeks or more. Returns {"summary": summary.json's entry, "rows", "volume_change", "figures":
    {patient: path relative to out}} for the report."""
    rows = longitudinal_rows(results, class_names, weeks, volume_change)
    summary = {"csv": LONGITUDINAL_CSV if rows else None, "volume_change": volume_change,
               "patients": len({r["patient"] for r in rows}),
               "flagged": [{k: r[k] for k in ("patient", "week", "case", "organ", "volume_ml", "change_ml",
                                              "change_fraction")} for r in rows if r["flagged"]]}
    if not rows:
        summary["reason"] = ("no case id is a HipMRI name (Case_004_Week0, K004_Week0); group them with "
                             "--patient-of")
        return {"summary": summary, "rows": [], "volume_change": volume_change, "figures": {}}
    write_rows(rows, out / LONGITUDINAL_CSV)
    drawn = {}
    if figures:
        from pelvicseg.figures import save_volume_timeline  # matplotlib only when figures are drawn
        taken: set[str] = set()
        for patient in dict.fromkeys(r["patient"] for r in rows):
            mine = [r for r in rows if r["patient"] == patient]
            week_numbers = list(dict.fromkeys(r["week"] for r in mine))
            if len(week_numbers) < 2:
                continue
            name = figure_name(patient, taken)
            save_volume_timeline(week_numbers, {o: [r["volume_ml"] for r in mine if r["organ"] == o]
                                                for o in class_names[1:]},
                                 class_names, out / "figures" / name, title=f"patient {patient}",
                                 flagged={o: [bool(r["flagged"]) for r in mine if r["organ"] == o]
                                          for o in class_names[1:]})
            drawn[patient] = f"figures/{name}"
    return {"summary": summary, "rows": rows, "volume_change": volume_change, "figures": drawn}


def figure_name(patient: str, taken: set[str]) -> str:
    """A file name for the patient's figure, unique ignoring case (patient ids from --patient-of
    may hold any character)."""
    stem, copy = f"longitudinal_{re.sub(r'[^A-Za-z0-9._-]+', '_', patient)}", 2
    name = stem
    while name.lower() in taken:
        name, copy = f"{stem}_{copy}", copy + 1
    taken.add(name.lower())
    return f"{name}.png"


def summary_line(summary: dict) -> str | None:
    """predict.py's line about the run's patients, None where no case belongs to one."""
    if not summary["csv"]:
        return None
    flagged = summary["flagged"]
    named = "; ".join(f"{f['patient']} week {f['week']} {f['organ']}" for f in flagged[:8])
    return (f"Over the weeks: {summary['patients']} patient(s) in {summary['csv']}; {len(flagged)} organ-week(s) "
            f"differ from the first week by more than {summary['volume_change'] * 100:g} %"
            + (f" ({named}{'; ...' if len(flagged) > 8 else ''})" if flagged else ""))
