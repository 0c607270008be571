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
from pelvicseg.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from dataset import find_cases  # noqa: E402
from pelvicseg import adaptation  # noqa: E402
from pelvicseg.inference import load_members  # noqa: E402
from pelvicseg.segmenter import Segmenter  # noqa: E402
import nibabel as nib  # noqa: E402


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
    assert record["parent"] == str((parent["run"] / "best.pt").resolve())
    import hashlib
    assert record["parent_sha256"] == hashlib.sha256((parent["run"] / "best.pt").read_bytes()).hexdigest()
    reference = [c for c in find_cases(parent["data"]) if c.patient == adapted["patient"] and c.week == 0]
    assert [r["image"] for r in record["reference"]] == [str(Path(reference[0].image).resolve())]
    assert [r["label"] for r in record["reference"]] == [str(Path(reference[0].label).resolve())]
    assert state["config"]["spacing"] == parent_state["config"]["spacing"]
    assert state["class_names"] == parent_state["class_names"]
    assert record["settings"] == {"steps": 60, "lr": 3e-3, "augment": False, "trainable": "all", "l2sp": 0.0,
                                  "replay": 0}
    # without adaptation.json: every organ adapted, under the default guard
    assert record["organs"] == {name: "adapted" for name in parent_state["class_names"][1:]}
    assert record["guard"]["bladder"] == adaptation.DEFAULT_GUARD
    # the weights did change, and the folder is a run folder
    assert any(not torch.equal(state["model"][k], parent_state["model"][k]) for k in state["model"])
    for name in ("config.json", "splits.json", "postprocessing.json", "uncertainty.json", "adapted.json"):
        assert (adapted["out"] / name).is_file(), name


def test_export_refuses_an_adapted_model_whose_guard_a_bundle_cannot_carry(parent, adapted, tmp_path, capsys):
    import export

    capsys.readouterr()
    code = run_cli(export.main, export.get_args(["--checkpoint", str(adapted["out"]), "--out", str(tmp_path / "b")]))
    line = one_line_error(code, capsys.readouterr().err)
    assert str(adapted["out"] / "best.pt") in line and "export the parent" in line, line
    assert str(parent["run"] / "best.pt") in line or str((parent["run"] / "best.pt").resolve()) in line, line
    assert not (tmp_path / "b").exists()


def numpy_dice(predicted: np.ndarray, truth: np.ndarray, num_classes: int = 6) -> np.ndarray:
    """Per-class Dice computed here, NaN where a class is absent from both."""
    dice = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mine, theirs = predicted == c, truth == c
        if mine.sum() + theirs.sum():
            dice[c] = 2.0 * np.logical_and(mine, theirs).sum() / (mine.sum() + theirs.sum())
    return dice


def case_files(data: Path, patient: str, week: int) -> tuple[Path, np.ndarray]:
    case = next(c for c in find_cases(data) if c.patient == patient and c.week == week)
    return Path(case.image), np.asarray(nib.load(case.label).dataobj).astype(np.int64)


def segment(checkpoint: Path, image: Path, guard: bool = True) -> np.ndarray:
    members = load_members([checkpoint])
    return np.asarray(Segmenter(members, "cpu", guard=guard)(image).dataobj)


def test_adaptation_raises_the_dice_on_the_reference_scan_above_the_parents(parent, adapted):
    image, truth = case_files(parent["data"], adapted["patient"], 0)
    # both models segment the reference scan here, Dice in numpy (the adapted one unguarded: its own weights)
    parent_dice = numpy_dice(segment(parent["run"], image), truth)[1:]
    adapted_dice = numpy_dice(segment(adapted["out"], image, guard=False), truth)[1:]
    assert np.nanmean(adapted_dice) > np.nanmean(parent_dice) + 0.05, (parent_dice, adapted_dice)
    record = json.loads((adapted["out"] / "adapted.json").read_text())
    assert record["used"] is True
    assert record["reference_mean_fg_dice_adapted"] == pytest.approx(np.nanmean(adapted_dice), abs=1e-6)


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
    run_dir, data = parent["run"], parent["data"]
    validation, test_patient = parent["split"]["val"], parent["split"]["test"][0]
    # --data-root and --patients given on a successful run
    code, out, err = run_adapt(["--choose-on-validation", run_dir, "--data-root", data, "--patients", validation[0],
                                "--steps-grid", "0", "2", "4", "--lr-grid", "3e-3", "--augment-grid", "on", "off",
                                "--device", "cpu"], capsys)
    assert code == 0, err
    chosen_file = json.loads((run_dir / adapt.SETTINGS_FILE).read_text())
    assert chosen_file["patients"] == validation
    scored = {(r["patient"], r["week"]) for r in chosen_file["records"]}
    assert scored == {(validation[0], 1), (validation[0], 2)}  # later weeks of the validation patient only
    table = chosen_file["table"]
    assert {(row["steps"], row["augment"]) for row in table} == {(0, None), (2, True), (2, False), (4, True),
                                                                   (4, False)}
    # the adapted weights were scored, not the parent's: an adapted record differs from the parent's on the same scan
    records = chosen_file["records"]
    parent_by_case = {r["case"]: r["dice"] for r in records if r["steps"] == 0}
    assert any(not np.allclose(r["dice"], parent_by_case[r["case"]], equal_nan=True) for r in records
               if r["steps"] == 4), "every adapted record equals the parent's"
    # the per-organ decision, recomputed here from the table: an organ is adapted only if the chosen row
    # keeps it within 0.01 of the parent
    parent_row = next(row for row in table if row["steps"] == 0)
    names = chosen_file["class_names"]
    winner = next(row for row in table if row["steps"] == chosen_file["chosen"]["steps"]
                  and row["augment"] == (chosen_file["chosen"]["augment"] if row["steps"] else None))
    for c, name in enumerate(names[1:], start=1):
        if chosen_file["organs"][name] == "adapted":
            assert winner["dice"][c] >= parent_row["dice"][c] - 0.01 - 1e-9, name
    assert set(chosen_file["guard"]) == set(names[1:])
    # a second choice does not overwrite the first by surprise
    code, _, err = run_adapt(["--choose-on-validation", run_dir, "--steps-grid", "0", "1", "--lr-grid", "1e-3"], capsys)
    assert "already exists" in one_line_error(code, err)

    # adapt.py now takes the chosen setting and decision by default
    code, out, err = run_adapt(["--checkpoint", run_dir, "--patient", test_patient, "--out", tmp_path / "chosen",
                                "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "chosen" / "adapted.json").read_text())
    assert record["settings"]["steps"] == chosen_file["chosen"]["steps"]
    assert "chosen on validation" in record["settings_source"]
    assert record["organs"] == chosen_file["organs"] and record["guard"] == chosen_file["guard"]

    # the protocol on the test patients: parent and adapted on weeks 1 and 2 of the test patient
    code, out, err = run_adapt(["--evaluate", run_dir, "--steps", "3", "--lr", "3e-3", "--augment", "off",
                                "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads((run_dir / adapt.EVALUATION_FILE).read_text())
    assert result["weeks_scored"] == 2 and len(result["seconds_per_adaptation"]) == 1
    assert result["organs"] == chosen_file["organs"]  # the per-organ decision it delivered with
    parent_records = [r for r in result["records"] if r["steps"] == 0]
    assert {r["week"] for r in parent_records} == {1, 2}
    bladder = result["class_names"].index("bladder")
    assert result["parent"]["dice"]["bladder"] == pytest.approx(np.mean([r["dice"][bladder] for r in parent_records]))
    assert "HD95 parent" in out and "bladder" in out and "worst" in out
    for name in names[1:]:
        weeks = result["per_week"][name]["weeks"]
        assert set(weeks) == {"1", "2"}
        worst = min(weeks, key=lambda w: weeks[w]["change"])
        assert result["per_week"][name]["worst_week"] == int(worst)
    # the adapted week 1 figure, measured here: the test patient adapted alone with the same setting and
    # seed, its week 1 segmented as predict.py does (guarded by the parent), Dice in numpy
    code, _, err = run_adapt(["--checkpoint", run_dir, "--patient", test_patient, "--steps", "3", "--lr", "3e-3",
                              "--augment", "off", "--out", tmp_path / "same", "--device", "cpu"], capsys)
    assert code == 0, err
    image, truth = case_files(data, test_patient, 1)
    independent = numpy_dice(segment(tmp_path / "same", image), truth)
    reported = next(r for r in result["records"] if r["steps"] == 3 and r["week"] == 1)["dice"]
    np.testing.assert_allclose(np.array(reported, dtype=float), independent, atol=0.01)
    # and the adapted weights alone segment week 1 differently from the parent
    unguarded, parent_labels = segment(tmp_path / "same", image, guard=False), segment(run_dir, image)
    assert (unguarded != parent_labels).any()

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

    # the report of an adapted run's predictions says which organs are adapted
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(tmp_path / "chosen"), "--data-root", str(data),
                                                   "--split", "test", "--out", str(tmp_path / "p"), "--device", "cpu",
                                                   "--no-figures", "--no-hd95"]))
    assert code == 0
    html = (tmp_path / "p" / "report.html").read_text()
    adapted_organs = ",".join(n for n in names[1:] if chosen_file["organs"][n] == "adapted")
    kept_organs = ",".join(n for n in names[1:] if chosen_file["organs"][n] == "parent")
    assert f'data-adapted="{adapted_organs}" data-parent="{kept_organs}"' in html


def test_cumulative_adaptation_and_overwrite(parent, adapted, capsys):
    """Several --reference-weeks at once; --overwrite replaces an adapted run in --out."""
    out = adapted["out"].parent / "cumulative"
    argv = ["--checkpoint", parent["run"], "--patient", adapted["patient"], "--reference-weeks", "0", "1",
            "--steps", "4", "--lr", "3e-3", "--augment", "off", "--out", out, "--device", "cpu"]
    code, _, err = run_adapt(argv, capsys)
    assert code == 0, err
    record = json.loads((out / "adapted.json").read_text())
    assert [(r["patient"], r["week"]) for r in record["reference"]] == [(adapted["patient"], 0), (adapted["patient"], 1)]
    assert len(record["reference_dice_adapted"]) == 2
    first = load_checkpoint(out / "best.pt")["model"]
    code, _, err = run_adapt(argv, capsys)
    assert "--overwrite" in one_line_error(code, err)
    code, _, err = run_adapt(argv[:-4] + ["--steps", "6", "--lr", "3e-3", "--augment", "off", "--seed", "3",
                                          "--out", out, "--device", "cpu", "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "adapted.json").read_text())["settings"]["steps"] == 6
    second = load_checkpoint(out / "best.pt")["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)


def row(steps, dice, **setting):
    return {"steps": steps, "lr": setting.get("lr"), "augment": setting.get("augment"), "trainable": None,
            "l2sp": None, "replay": None, "dice": dice, "case": "c", "patient": "p", "week": 1}


def test_constrained_choice_refuses_an_organ_loss_and_keeps_the_parents_organ():
    names = ["background", "body", "bone", "bladder", "rectum", "prostate"]
    parent_dice = [1.0, 0.90, 0.80, 0.70, 0.60, 0.50]
    # A: the best mean gain (+0.20 bladder), but rectum loses 0.05; B: smaller gains, rectum within 0.01;
    # prostate loses 0.10 in both, so it stays the parent's
    a = [1.0, 0.95, 0.85, 0.90, 0.55, 0.40]
    b = [1.0, 0.92, 0.82, 0.75, 0.595, 0.40]
    records = [row(0, parent_dice), row(10, a, lr=1e-3, augment=False), row(20, b, lr=1e-3, augment=False)]
    table = adaptation.table_of(records, len(names))
    chosen = adaptation.choose_from(table, names)
    assert chosen["steps"] == 20
    # B's rectum (-0.005) meets the constraint but does not gain: it stays the parent's too
    assert chosen["organs"] == {"body": "adapted", "bone": "adapted", "bladder": "adapted", "rectum": "parent",
                                "prostate": "parent"}
    expected = np.array([0.02, 0.02, 0.05, 0.0, 0.0])  # rectum and prostate counted as the parent's
    assert chosen["mean_gain"] == pytest.approx(expected.mean())
    assert chosen["gain"]["prostate"] == 0.0 and chosen["gain"]["rectum"] == 0.0
    assert chosen["gain"]["bladder"] == pytest.approx(0.05)
    # the unconstrained best mean (A, 0.026 against 0.017 even with the prostate's loss) is what it refused
    assert np.mean(np.array(a[1:]) - parent_dice[1:]) > np.mean(np.array(b[1:]) - parent_dice[1:])
    # each setting loses one organ by more than 0.01, each organ is kept by some setting: the parent wins
    worse = [1.0, 0.95, 0.85, 0.90, 0.40, 0.40]
    chosen = adaptation.choose_from(adaptation.table_of([row(0, parent_dice), row(10, worse, lr=1e-3, augment=False),
                                                         row(20, [1.0, 0.5, 0.9, 0.9, 0.9, 0.9], lr=1e-3,
                                                             augment=False)], len(names)), names)
    assert chosen["steps"] == 0 and set(chosen["organs"].values()) == {"parent"}


def test_guard_falls_back_to_the_parents_organ_and_flags_the_case(parent, adapted, capsys, tmp_path):
    """An adapted model whose bladder covers the whole scan (its head's bladder bias raised): predict.py
    delivers the parent's bladder, flags the case with the reason, and the report says so."""
    guarded = tmp_path / "guarded"
    shutil.copytree(adapted["out"], guarded)
    state = load_checkpoint(guarded / "best.pt")
    bladder = state["class_names"].index("bladder")
    state["model"]["head.bias"][bladder] += 100.0
    torch.save(state, guarded / "best.pt")
    image, truth = case_files(parent["data"], adapted["patient"], 1)
    unguarded = segment(guarded, image, guard=False)
    assert (unguarded == bladder).mean() > 0.9  # the broken model: bladder nearly everywhere
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(guarded), "--data-root", str(parent["data"]),
                                                   "--split", "test", "--out", str(tmp_path / "p"), "--device", "cpu",
                                                   "--no-figures", "--no-hd95"]))
    assert code == 0, capsys.readouterr().err
    case_id = Path(image).name.replace("_LFOV.nii.gz", "")
    delivered = np.asarray(nib.load(tmp_path / "p" / f"{case_id}_pred.nii.gz").dataobj)
    parent_labels = segment(parent["run"], image)
    # every voxel the broken model called bladder came back from the parent: here, the parent's labels throughout
    np.testing.assert_array_equal(delivered == bladder, parent_labels == bladder)
    np.testing.assert_array_equal(delivered, parent_labels)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    flags = [f for f in summary["flagged"] if f["case"] == case_id and f["organ"] == "bladder"]
    assert flags and "disagrees with its parent" in flags[0]["reason"]
    assert "bladder: adapted model disagrees with its parent" in (tmp_path / "p" / "report.html").read_text()
    # a changed parent is refused rather than predicted unguarded
    record = state["adaptation"]
    state["adaptation"] = {**record, "parent_sha256": "0" * 64}
    torch.save(state, guarded / "best.pt")
    with pytest.raises(CheckpointError, match="has changed since the adaptation"):
        Segmenter.from_checkpoints(guarded, device="cpu")


def test_augment_wide_deforms_more_than_the_parents_augmentation_and_is_recorded(parent, capsys, tmp_path):
    from dataset import DeviceAugmentation

    # a 12-voxel cube in a 32^3 crop, deformed 20 times by each augmentation with the same seeds:
    # the share of voxels whose label changed, counted here
    labels = torch.zeros(1, 1, 32, 32, 32)
    labels[..., 10:22, 10:22, 10:22] = 1
    images = labels.clone()

    def changed(augmentation) -> float:
        shares = []
        for seed in range(20):
            _, moved = augmentation(images, labels, torch.Generator().manual_seed(seed))
            shares.append(float((moved != labels).float().mean()))
        return sum(shares) / len(shares)

    parents, wide = changed(DeviceAugmentation()), changed(DeviceAugmentation(**adaptation.WIDE_AUGMENTATION))
    assert wide > 1.5 * parents > 0, (parents, wide)

    out = tmp_path / "wide"
    code, _, err = run_adapt(["--checkpoint", parent["run"], "--patient", parent["split"]["test"][0], "--steps", "2",
                              "--lr", "3e-3", "--augment", "wide", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads((out / "adapted.json").read_text())["settings"]["augment"] == "wide"


def test_candidates_that_stay_near_the_parent(parent, capsys, tmp_path):
    """--trainable decoder freezes the encoder, --replay mixes a training patient's scan in, --l2sp adds
    the distance to the parent; the grids of --choose-on-validation try them."""
    out = tmp_path / "near"
    code, _, err = run_adapt(["--checkpoint", parent["run"], "--patient", parent["split"]["test"][0], "--steps", "3",
                              "--lr", "3e-3", "--augment", "off", "--trainable", "decoder", "--l2sp", "0.1",
                              "--replay", "1", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads((out / "adapted.json").read_text())
    assert record["settings"] == {"steps": 3, "lr": 3e-3, "augment": False, "trainable": "decoder", "l2sp": 0.1,
                                  "replay": 1}
    assert len(record["replay"]) == 1 and record["replay"][0].split("_")[1] in parent["split"]["train"]
    state, parent_state = load_checkpoint(out / "rejected.pt" if not record["used"] else out / "best.pt"), \
        load_checkpoint(parent["run"] / "best.pt")
    moved = {k for k in parent_state["model"] if not torch.equal(state["model"][k], parent_state["model"][k])}
    assert moved and all(k.startswith(("dec", "head")) for k in moved), sorted(moved)
    # the L2-SP term, computed here: the loss plus alpha times the squared distance to the start
    model = torch.nn.Linear(3, 2)
    base = torch.nn.MSELoss()
    penalised = adaptation.L2SPLoss(base, model, alpha=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    x, y = torch.ones(1, 3), torch.zeros(1, 2)
    assert float(penalised(model(x), y)) == pytest.approx(float(base(model(x), y)) + 0.5 * 6.0)

    run_dir = tmp_path / "run"
    shutil.copytree(parent["run"], run_dir)
    for name in (adapt.SETTINGS_FILE, adapt.EVALUATION_FILE):  # another test's choice may be there
        (run_dir / name).unlink(missing_ok=True)
    code, out_text, err = run_adapt(["--choose-on-validation", run_dir, "--data-root", parent["data"], "--steps-grid",
                                     "0", "1", "--lr-grid", "1e-3", "--augment-grid", "off", "--trainable-grid",
                                     "all", "norm_head", "--l2sp-grid", "0", "0.1", "--replay-grid", "0", "1",
                                     "--device", "cpu"], capsys)
    assert code == 0, err
    table = json.loads((run_dir / adapt.SETTINGS_FILE).read_text())["table"]
    assert {(r["trainable"], r["l2sp"], r["replay"]) for r in table if r["steps"] == 1} == {
        (t, a, n) for t in ("all", "norm_head") for a in (0.0, 0.1) for n in (0, 1)}
