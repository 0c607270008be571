"""Per-case records of a prediction run: ``<case>_record.json``, written (atomically) after every
other output of the case, says which files the case made, with which checkpoints (by SHA-256) and
settings, and holds the case's figures (metrics rows, Dice, flags, the report's entry).

A case is complete when its record is there, names this run's checkpoints and settings, and
every file it lists exists. ``predict.py --continue`` predicts only the cases that are not, and
every run, continued or not, builds metrics.csv, summary.json, longitudinal.csv and report.html
from the records alone: a continued run writes the same files as one that was never stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pelvicseg.atomic import write_json
from pelvicseg.checkpoint import file_sha256
from pelvicseg.metrics import json_ready

RECORD_SUFFIX = "_record.json"
RECORD_FORMAT = 1


def record_path(out: Path, case_id: str) -> Path:
    return out / f"{case_id}{RECORD_SUFFIX}"


def made_with(checkpoints: Sequence[str | Path], settings: dict) -> dict:
    """What decides a case's outputs: the checkpoints' bytes and the settings, keyed by their flag."""
    return {"checkpoints_sha256": [file_sha256(path) for path in checkpoints], "settings": dict(settings)}


def difference(recorded: dict, wanted: dict, input_id: dict) -> str | None:
    """Why a record was not made as this run would make it (None: it was), in words for the user."""
    if recorded.get("format") != RECORD_FORMAT:
        return f"record format {recorded.get('format')} (this version writes {RECORD_FORMAT})"
    made = recorded.get("made_with") or {}
    old, new = made.get("checkpoints_sha256"), wanted["checkpoints_sha256"]
    if old != new:
        shown = lambda digests: ", ".join(d[:12] for d in digests or []) or "none"  # noqa: E731
        return f"checkpoint(s) sha256 {shown(old)} (this run's: {shown(new)})"
    settings = made.get("settings") or {}
    for flag, value in wanted["settings"].items():
        if json_ready(settings.get(flag)) != json_ready(value):
            return f"{flag} {_shown(settings.get(flag, 'unrecorded'))} (this run: {_shown(value)})"
    if recorded.get("input") != input_id:
        return f"input {_shown(recorded.get('input'))} (this run: {_shown(input_id)})"
    return None


def _shown(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_shown(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def read_record(path: Path) -> dict | None:
    """The record, or None where there is none (or it cannot be read: the case is predicted again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def case_status(out: Path, case_id: str, wanted: dict, input_id: dict) -> tuple[str, str | None]:
    """("complete", None), ("incomplete", None) or ("different", why) for one case in ``out``."""
    record = read_record(record_path(out, case_id))
    if record is None:
        return "incomplete", None
    why = difference(record, wanted, input_id)
    if why:
        return "different", why
    if any(not (out / name).is_file() for name in record.get("outputs", [])):
        return "incomplete", None
    return "complete", None


def write_record(out: Path, case_id: str, wanted: dict, input_id: dict, outputs: Sequence[str], result: dict) -> dict:
    """The case's record, last of its files, and returned as ``read_record`` would read it back.
    ``result``: predict.py's figures of the case (arrays and NaN allowed; stored as lists and null)."""
    kept = {key: value for key, value in result.items() if key not in ("case", "labels")}
    record = json_ready(_plain({"format": RECORD_FORMAT, "case": case_id, "input": input_id, "made_with": wanted,
                                "outputs": list(outputs), "result": kept}))
    write_json(record_path(out, case_id), record)
    return record


def result_from_record(record: dict, case) -> dict:
    """predict.py's result of a case back from its record: arrays as arrays, null as NaN."""
    result = dict(record["result"])
    result["case"] = case
    for key in ("dice", "hd95", "scores"):
        if result.get(key) is not None:
            result[key] = np.array(result[key], dtype=float)
    if result.get("misses") is not None:
        result["misses"] = np.array(result["misses"], dtype=int)
    if "voxel_auroc" in result and result["voxel_auroc"] is None:
        result["voxel_auroc"] = math.nan
    result["rows"] = [_nan_for_null(row) for row in result["rows"]]
    report = dict(result["report"])
    report["metrics"] = {name: _nan_for_null(values) for name, values in report.get("metrics", {}).items()}
    result["report"] = report
    return result


def _nan_for_null(values: dict) -> dict:
    return {key: math.nan if value is None else value for key, value in values.items()}


def _plain(value):
    """numpy arrays as lists, recursively, for json_ready."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
