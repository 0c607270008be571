"""Adaptation across a week-to-week change in bladder filling: a model adapted on a scan with an
almost empty bladder must not lose the full bladder of the next week. The phantom's patients are
written with their fillings at the ends of a wide range (week 0: 0.3 of the usual volume, week 1:
twice it), the parent trained on them, the setting and per-organ decision chosen on the validation
patient, the test patient adapted on week 0 (--image/--label), and its week 1 segmented by the
adapted model (as predict.py does, guarded by the parent) and by the parent, Dice in numpy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import adapt  # noqa: E402
import train  # noqa: E402
from pelvicseg import phantom  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from pelvicseg.segmenter import Segmenter  # noqa: E402

FILLING = {0: 0.3, 1: 2.0}  # week -> bladder filling: the ends of a wide range
SHAPE = (32, 32, 16)
BLADDER = phantom.CLASS_NAMES.index("bladder")


def write_patient(root: Path, patient: int) -> None:
    for folder in ("semantic_MRs_anon", "semantic_labels_anon"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for week, filling in FILLING.items():
        image, label, affine = phantom.make_case(patient, week, SHAPE, seed=0, bladder_filling=(filling, filling))
        phantom.save_nifti(image, affine, root / "semantic_MRs_anon" / f"Case_{patient:03d}_Week{week}_LFOV.nii.gz")
        phantom.save_nifti(label, affine, root / "semantic_labels_anon" /
                           f"Case_{patient:03d}_Week{week}_SEMANTIC_LFOV.nii.gz")


def bladder_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    mine, theirs = predicted == BLADDER, truth == BLADDER
    return 2.0 * np.logical_and(mine, theirs).sum() / (mine.sum() + theirs.sum())


@pytest.fixture(scope="module")
def filling_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("filling")
    data = base / "data"
    for patient in range(4, 9):
        write_patient(data, patient)
    run_dir = base / "run"
    train.main(train.get_args(["--data-root", str(data), "--out", str(run_dir), "--epochs", "6", "--spatial-size",
                               "32", "32", "16", "--channels", "4", "8", "8", "8", "--lr", "3e-3", "--workers", "0",
                               "--device", "cpu"]))
    split = json.loads((run_dir / "splits.json").read_text())
    return {"base": base, "data": data, "run": run_dir, "split": split}


def test_bladder_of_a_week_filled_very_differently_is_not_lost(filling_run):
    run_dir, data = filling_run["run"], filling_run["data"]
    assert run_cli(adapt.main, adapt.get_args(["--choose-on-validation", str(run_dir), "--steps-grid", "0", "40",
                                               "--lr-grid", "3e-3", "--augment-grid", "off", "--device", "cpu"])) == 0
    patient = int(filling_run["split"]["test"][0])
    week0 = [data / "semantic_MRs_anon" / f"Case_{patient:03d}_Week0_LFOV.nii.gz",
             data / "semantic_labels_anon" / f"Case_{patient:03d}_Week0_SEMANTIC_LFOV.nii.gz"]
    out = filling_run["base"] / "adapted"
    assert run_cli(adapt.main, adapt.get_args(["--checkpoint", str(run_dir), "--image", str(week0[0]), "--label",
                                               str(week0[1]), "--steps", "40", "--lr", "3e-3", "--augment", "off",
                                               "--out", str(out), "--device", "cpu"])) == 0
    image = data / "semantic_MRs_anon" / f"Case_{patient:03d}_Week1_LFOV.nii.gz"
    truth = np.asarray(nib.load(data / "semantic_labels_anon" / f"Case_{patient:03d}_Week1_SEMANTIC_LFOV.nii.gz")
                       .dataobj).astype(np.int64)
    assert (truth == BLADDER).sum() > 4 * np.asarray(nib.load(week0[1]).dataobj == BLADDER).sum()  # filled far more
    parent = np.asarray(Segmenter.from_checkpoints(run_dir, device="cpu")(image).dataobj)
    adapted = np.asarray(Segmenter.from_checkpoints(out, device="cpu")(image).dataobj)
    parent_dice, adapted_dice = bladder_dice(parent, truth), bladder_dice(adapted, truth)
    assert parent_dice > 0.05, parent_dice  # the parent does find some of this bladder: there is something to lose
    assert adapted_dice >= parent_dice - 0.01, (parent_dice, adapted_dice)
