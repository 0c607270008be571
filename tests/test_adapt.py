"""adapt.py on a tiny phantom with 3 weeks per patient: the adapted run folder, what it records,
its refusals, the choice on validation patients and the protocol on test patients."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import adapt  # noqa: E402
from pelvicseg import phantom  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from dataset import find_cases  # noqa: E402


def run_adapt(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(adapt.main, adapt.get_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """5 patients x 3 weeks (split 3:1:1), one epoch of a tiny network."""
    base = tmp_path_factory.mktemp("adapt")
    data = base / "data"
    phantom.write_phantom(data, patients=5, weeks=3, shape=(20, 18, 12), seed=0)
    run_dir = base / "run"
    train.main(train.get_args(["--data-root", str(data), "--out", str(run_dir), "--epochs", "1", "--spatial-size",
                               "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu"]))
    split = json.loads((run_dir / "splits.json").read_text())
    return {"base": base, "data": data, "run": run_dir, "split": split}


@pytest.fixture(scope="module")
def adapted(parent, tmp_path_factory):
    out = parent["base"] / "adapted"
    patient = parent["split"]["test"][0]
    code = run_cli(adapt.main, adapt.get_args(["--checkpoint", str(parent["run"]), "--patient", patient,
                                               "--reference-weeks", "0", "--steps", "60", "--lr", "3e-3",
                                               "--augment", "off", "--out", str(out), "--device", "cpu"]))
    assert code == 0
    return {"out": out, "patient": patient}


def test_adapted_checkpoint_records_parent_and_reference_and_keeps_spacing_and_classes(parent, adapted):
    state = load_checkpoint(adapted["out"] / "best.pt")
    parent_state = load_checkpoint(parent["run"] / "best.pt")
    record = state["adaptation"]
    assert record["parent"] == str(parent["run"] / "best.pt")
    import hashlib
    assert record["parent_sha256"] == hashlib.sha256((parent["run"] / "best.pt").read_bytes()).hexdigest()
    reference = [c for c in find_cases(parent["data"]) if c.patient == adapted["patient"] and c.week == 0]
    assert [r["image"] for r in record["reference"]] == [str(Path(reference[0].image).resolve())]
    assert [r["label"] for r in record["reference"]] == [str(Path(reference[0].label).resolve())]
    assert state["config"]["spacing"] == parent_state["config"]["spacing"]
    assert state["class_names"] == parent_state["class_names"]
    assert record["settings"] == {"steps": 60, "lr": 3e-3, "augment": False}
    # the weights did change, and the folder is a run folder
    assert any(not torch.equal(state["model"][k], parent_state["model"][k]) for k in state["model"])
    for name in ("config.json", "splits.json", "postprocessing.json", "uncertainty.json", "adapted.json"):
        assert (adapted["out"] / name).is_file(), name


def test_adaptation_raises_the_dice_on_the_reference_scan_above_the_parents(adapted):
    record = json.loads((adapted["out"] / "adapted.json").read_text())
    parent_dice = np.array(record["reference_dice_parent"][0]["dice"][1:], dtype=float)
    adapted_dice = np.array(record["reference_dice_adapted"][0]["dice"][1:], dtype=float)
    # the mean over the organs, computed here from the per-class figures
    assert np.nanmean(adapted_dice) > np.nanmean(parent_dice) + 0.05, (parent_dice, adapted_dice)
    assert record["used"] is True


def test_predict_loads_the_adapted_run(parent, adapted, capsys, tmp_path):
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(adapted["out"]), "--data-root",
                                                   str(parent["data"]), "--split", "test", "--out", str(tmp_path / "p"),
                                                   "--device", "cpu", "--no-figures", "--no-hd95"]))
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["checkpoint"] == str(adapted["out"] / "best.pt")


def test_worse_adaptation_is_said_and_not_used(adapted, capsys, tmp_path):
    """An adapted run as parent (cumulative adaptation), thrown off by a far too high rate."""
    out = tmp_path / "worse"
    code, _, err = run_adapt(["--checkpoint", adapted["out"], "--patient", adapted["patient"], "--reference-weeks",
                              "0", "--steps", "8", "--lr", "1.0", "--augment", "off", "--out", out,
                              "--device", "cpu"], capsys)
    assert code == 0
    assert "below its parent" in err
    record = json.loads((out / "adapted.json").read_text())
    assert record["used"] is False
    assert record["reference_mean_fg_dice_adapted"] < record["reference_mean_fg_dice_parent"]
    kept, parent_state = load_checkpoint(out / "best.pt"), load_checkpoint(adapted["out"] / "best.pt")
    assert all(torch.equal(kept["model"][k], parent_state["model"][k]) for k in kept["model"])
    rejected = load_checkpoint(out / "rejected.pt")
    assert any(not torch.equal(rejected["model"][k], parent_state["model"][k]) for k in kept["model"])


def test_refusals_are_one_line(parent, hipmri, capsys, tmp_path):
    run_dir, patient = parent["run"], parent["split"]["test"][0]
    # reference contours with a class the parent lacks (value 6 with six classes 0..5)
    image, label = hipmri.write_case(tmp_path / "extra", 4, 0)
    labels = np.asarray(hipmri.synthetic_case()[1]).copy()
    labels[0, 0, 0] = 6
    hipmri.write_nifti(label, labels, dtype=np.uint8)
    code, _, err = run_adapt(["--checkpoint", run_dir, "--image", image, "--label", label, "--out", tmp_path / "a",
                              "--device", "cpu", "--steps", "1"], capsys)
    assert "outside 0..5" in one_line_error(code, err) and str(label) in err
    # another spacing forced
    code, _, err = run_adapt(["--checkpoint", run_dir, "--patient", patient, "--spacing", "1", "1", "1",
                              "--out", tmp_path / "b"], capsys)
    assert "differs from the parent's" in one_line_error(code, err)
    # a patient whose reference week has no contours
    data = tmp_path / "nolabel"
    shutil.copytree(parent["data"], data)
    case = next(c for c in find_cases(data) if c.patient == patient and c.week == 0)
    Path(case.label).unlink()
    code, _, err = run_adapt(["--checkpoint", run_dir, "--data-root", data, "--patient", patient, "--out",
                              tmp_path / "c"], capsys)
    assert "no contours" in one_line_error(code, err)
    # a test patient used to choose the setting
    code, _, err = run_adapt(["--choose-on-validation", run_dir, "--patients", patient], capsys)
    assert "is a test patient" in one_line_error(code, err)
    # nothing was written by any of them
    assert not any((tmp_path / name).exists() for name in "abc")
    assert not (run_dir / adapt.SETTINGS_FILE).exists()


def test_choose_on_validation_then_adapt_uses_it_and_evaluate_compares_with_the_parent(parent, capsys, tmp_path):
    run_dir = parent["run"]
    code, out, err = run_adapt(["--choose-on-validation", run_dir, "--steps-grid", "0", "2", "4", "--lr-grid", "1e-3",
                                "--augment-grid", "on", "off", "--device", "cpu"], capsys)
    assert code == 0, err
    chosen_file = json.loads((run_dir / adapt.SETTINGS_FILE).read_text())
    validation = parent["split"]["val"]
    assert chosen_file["patients"] == validation
    scored = {(r["patient"], r["week"]) for r in chosen_file["records"]}
    assert scored == {(validation[0], 1), (validation[0], 2)}  # later weeks of the validation patient only
    table = chosen_file["table"]
    assert {(row["steps"], row["augment"]) for row in table} == {(0, None), (2, True), (2, False), (4, True),
                                                                   (4, False)}
    best = max(row["mean_fg_dice"] for row in table)
    winner = next(row for row in sorted(table, key=lambda r: r["steps"]) if row["mean_fg_dice"] >= best - 1e-4)
    assert chosen_file["chosen"]["steps"] == winner["steps"]
    # a second choice does not overwrite the first by surprise
    code, _, err = run_adapt(["--choose-on-validation", run_dir, "--steps-grid", "0", "1", "--lr-grid", "1e-3"], capsys)
    assert "already exists" in one_line_error(code, err)

    # adapt.py now takes the chosen setting by default
    code, out, err = run_adapt(["--checkpoint", run_dir, "--patient", parent["split"]["test"][0], "--out",
                                tmp_path / "chosen", "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "chosen" / "adapted.json").read_text())
    assert record["settings"]["steps"] == chosen_file["chosen"]["steps"]
    assert "chosen on validation" in record["settings_source"]

    # the protocol on the test patients: parent and adapted on weeks 1 and 2 of the test patient
    code, out, err = run_adapt(["--evaluate", run_dir, "--steps", "3", "--lr", "1e-3", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads((run_dir / adapt.EVALUATION_FILE).read_text())
    assert result["weeks_scored"] == 2 and len(result["seconds_per_adaptation"]) == 1
    parent_records = [r for r in result["records"] if r["steps"] == 0]
    assert {r["week"] for r in parent_records} == {1, 2}
    bladder = result["class_names"].index("bladder")
    assert result["parent"]["dice"]["bladder"] == pytest.approx(np.mean([r["dice"][bladder] for r in parent_records]))
    assert "HD95 parent" in out and "bladder" in out

    # again without HD95, another seed: refused over the first file unless --overwrite
    code, _, err = run_adapt(["--evaluate", run_dir, "--steps", "1", "--no-hd95", "--device", "cpu"], capsys)
    assert "already exists" in one_line_error(code, err)
    code, out, err = run_adapt(["--evaluate", run_dir, "--steps", "1", "--lr", "1e-3", "--no-hd95", "--seed", "1",
                                "--overwrite", "--device", "cpu"], capsys)
    assert code == 0, err
    again = json.loads((run_dir / adapt.EVALUATION_FILE).read_text())
    assert "hd95" not in again["parent"] and again["settings"]["steps"] == 1 and "HD95" not in out
    assert again["seed"] == 1
    assert all(r["hd95"] is None for r in again["records"])
