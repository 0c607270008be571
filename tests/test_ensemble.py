"""Cross-validation folds, fold ensembles and post-processing learned on validation (inference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
import train
from pelvicseg.checkpoint import CheckpointError, save_checkpoint
from pelvicseg.cli import run_cli
from dataset import DataError, Case, load_or_make_split, make_folds, split_patients
from pelvicseg.inference import Ensemble, Member, decide_postprocessing, keep_largest_component, load_members, volume_figures
from modules import ImprovedUNet3D

PATIENTS = [f"{p:03d}" for p in range(4, 19)]  # 15 patients
TINY = ["--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu",
        "--epochs", "1"]


# ----------------------------------------------------------------------------- folds

def test_folds_are_patient_level_disjoint_cover_the_non_test_patients_and_are_seeded():
    test = split_patients(PATIENTS, seed=0)["test"]
    folds = make_folds(PATIENTS, test, 3, seed=0)
    assert len(folds) == 3
    flat = [p for fold in folds for p in fold]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == sorted(set(PATIENTS) - set(test))  # every non-test patient, no test patient
    assert sorted(len(f) for f in folds) == [4, 4, 4]
    assert make_folds(PATIENTS, test, 3, seed=0) == folds
    assert make_folds(PATIENTS, test, 3, seed=1) != folds
    with pytest.raises(DataError, match="--folds 13"):
        make_folds(PATIENTS, test, 13, seed=0)


def test_every_fold_run_folder_holds_the_same_split_file(tmp_path):
    cases = [Case(f"{p}.nii.gz", None, p, p, 0) for p in PATIENTS]
    test = split_patients(PATIENTS, seed=0)["test"]
    stored = []
    for fold in range(3):
        split = load_or_make_split(cases, tmp_path / f"fold{fold}" / "splits.json", seed=0, folds=3, fold=fold)
        stored.append(json.loads((tmp_path / f"fold{fold}" / "splits.json").read_text()))
        assert split["test"] == test  # fixed, as in the plain 6:2:2 split
        assert split["val"] == stored[-1]["folds"][fold]
        assert set(split["train"]) == set(PATIENTS) - set(test) - set(split["val"])
    assert stored[0] == stored[1] == stored[2] and stored[0]["test"] == test
    # reused, not remade: a fold folder given another --folds is told so
    with pytest.raises(DataError, match="holds 3 folds"):
        load_or_make_split(cases, tmp_path / "fold0" / "splits.json", seed=0, folds=4, fold=0)


# ----------------------------------------------------------------------------- ensembles

def member(seed: int, config=None) -> Member:
    torch.manual_seed(seed)
    model_args = {"in_channels": 1, "out_channels": 6, "channels": [4, 8, 8, 8]}
    model = ImprovedUNet3D(**model_args)
    config = config or {"spacing": [2.0, 2.0, 2.0], "class_names": ["bg", "a", "b", "c", "d", "e"]}
    return Member(f"model{seed}.pt", model_args, model.state_dict(), config, Path("."), None)


def softmax_of(m: Member, image: torch.Tensor) -> torch.Tensor:
    """The member's own softmax, straight from its network (one window covers the whole volume)."""
    model = ImprovedUNet3D(**m.model_args)
    model.load_state_dict(m.weights)
    with torch.no_grad():
        return torch.softmax(model.eval()(image), dim=1)


def test_an_ensemble_of_one_model_is_that_model():
    image = torch.rand(1, 1, 16, 16, 16)
    one = member(0)
    got = Ensemble([one], torch.device("cpu"), None).probabilities(image, None, 0.5, False)
    torch.testing.assert_close(got, softmax_of(one, image), rtol=1e-5, atol=1e-6)


def test_an_ensemble_of_two_models_is_the_average_of_their_probabilities():
    image = torch.rand(1, 1, 16, 16, 16)
    first, second = member(0), member(1)
    expected = (softmax_of(first, image) + softmax_of(second, image)) / 2
    assert not torch.allclose(softmax_of(first, image), softmax_of(second, image), atol=1e-3)  # really different
    got = Ensemble([first, second], torch.device("cpu"), None).probabilities(image, None, 0.5, False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_members_that_disagree_on_classes_or_spacing_are_refused(tmp_path):
    def write(name, spacing, classes):
        torch.manual_seed(0)
        args = {"in_channels": 1, "out_channels": len(classes), "channels": [4, 8, 8, 8]}
        state = {"model": ImprovedUNet3D(**args).state_dict(), "model_args": args, "class_names": classes,
                 "config": {"spacing": spacing, "class_names": classes}}
        save_checkpoint(state, tmp_path / name)
        return str(tmp_path / name)

    six = ["bg", "a", "b", "c", "d", "e"]
    good, coarse = write("a.pt", [2.0, 2.0, 2.0], six), write("b.pt", [3.0, 3.0, 3.0], six)
    fewer = write("c.pt", [2.0, 2.0, 2.0], six[:4])
    assert len(load_members([good, good])) == 2
    # folds whose spacing came from their own training patients differ by a rounding: one grid
    assert len(load_members([good, write("near.pt", [2.02, 2.0, 1.99], six)])) == 2
    for other, key in ((coarse, "spacing"), (fewer, "class_names")):
        with pytest.raises(CheckpointError) as caught:
            load_members([good, other])
        message = str(caught.value)
        assert "\n" not in message and key in message and other in message


# ----------------------------------------------------------------------------- post-processing

def organ(shape, box) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in box)] = True
    return mask


def test_largest_component_is_kept_where_it_helps_and_dropped_where_it_harms():
    shape = (24, 24, 24)
    volumes = []
    for shift in range(4):
        target = np.zeros(shape, dtype=np.uint8)
        target[organ(shape, [(2 + shift, 12 + shift), (2, 12), (2, 12)])] = 1  # organ 1: one true part
        target[organ(shape, [(2, 6), (16, 20), (16, 20)])] = 2  # organ 2: two true parts
        target[organ(shape, [(16, 20), (16, 20), (2 + shift, 6 + shift)])] = 2
        prediction = target.copy()
        prediction[20, 2, 20] = 1  # stray islands of organ 1, far from it
        prediction[22, 12, 2] = 1
        volumes.append(volume_figures(prediction, target, 3, (1.0, 1.0, 1.0)))
        # by hand: the islands cost organ 1 two false positives; removing them is exact
        organ_voxels = int((target == 1).sum())
        assert volumes[-1]["dice"][1] == pytest.approx(2 * organ_voxels / (2 * organ_voxels + 2))
        assert volumes[-1]["dice_lcc"][1] == pytest.approx(1.0)
        # organ 2's smaller true part is lost by "largest component only": Dice 2 x 64 / (64 + 128)
        assert volumes[-1]["dice_lcc"][2] == pytest.approx(2 * 64 / (64 + 128))
    decision = decide_postprocessing(volumes, ["background", "organ", "paired"])
    assert decision["largest_component"] == ["organ"]
    assert decision["per_class"]["organ"]["keep"] and not decision["per_class"]["paired"]["keep"]


def test_a_step_that_only_lowers_hd95_without_costing_dice_is_kept():
    """Islands the size of the organ's surface error: Dice rises a little, HD95 falls a lot."""
    shape = (30, 30, 30)
    target = np.zeros(shape, dtype=np.uint8)
    target[organ(shape, [(2, 10), (2, 10), (2, 10)])] = 1
    prediction = target.copy()
    prediction[organ(shape, [(24, 28), (24, 28), (24, 28)])] = 1  # a large far island
    figures = volume_figures(prediction, target, 2, (1.0, 1.0, 1.0))
    assert figures["hd95_lcc"][1] == pytest.approx(0.0) and figures["hd95"][1] > 10
    decision = decide_postprocessing([figures], ["background", "organ"])
    assert decision["largest_component"] == ["organ"]


def test_keep_largest_component_removes_islands_to_background_only_for_its_classes():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:5, 1:5, 1:5] = 3
    labels[8, 8, 8] = 3  # island of class 3
    labels[6:8, 1:3, 1:3] = 2
    labels[1, 8, 8] = 2  # island of class 2, left alone
    kept = keep_largest_component(labels, [3])
    expected = labels.copy()
    expected[8, 8, 8] = 0
    np.testing.assert_array_equal(kept, expected)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def two_folds(training_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("folds")
    runs = []
    for fold in (0, 1):
        run_dir = base / f"fold{fold}"
        code = run_cli(train.main, train.get_args(["--data-root", str(training_root), "--out", str(run_dir),
                                                   "--folds", "2", "--fold", str(fold), *TINY]))
        assert code == 0
        runs.append(run_dir)
    return base, runs


def test_two_tiny_folds_train_on_disjoint_validation_and_decide_post_processing(two_folds):
    _, runs = two_folds
    splits = [json.loads((r / "splits.json").read_text()) for r in runs]
    assert splits[0] == splits[1] and len(splits[0]["folds"]) == 2
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert [c["fold"] for c in configs] == [0, 1] and configs[0]["spacing"] == configs[1]["spacing"]
    for run_dir, fold in zip(runs, (0, 1)):
        decision = json.loads((run_dir / "postprocessing.json").read_text())
        assert {v["case"][:8] for v in decision["volumes"]} == {f"Case_{p}" for p in splits[0]["folds"][fold]}
        assert set(decision["per_class"]) == {"body", "bone", "bladder", "rectum", "prostate"}


def test_predict_ensembles_two_folds_and_applies_or_skips_post_processing(two_folds, training_root, capsys):
    base, runs = two_folds
    out = base / "ensemble"
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(runs[0]), str(runs[1] / "best.pt"),
                                                   "--data-root", str(training_root), "--split", "test",
                                                   "--out", str(out), "--device", "cpu", "--no-figures", "--no-hd95"]))
    assert code == 0, capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"] == [str(runs[0] / "best.pt"), str(runs[1] / "best.pt")]
    pooled = [v for r in runs for v in json.loads((r / "postprocessing.json").read_text())["volumes"]]
    expected = decide_postprocessing(pooled, ["background", "body", "bone", "bladder", "rectum", "prostate"])
    assert summary["postprocessing"]["largest_component"] == expected["largest_component"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "postprocessing"
    skipped = base / "ensemble_raw"
    code = run_cli(predict.main, predict.get_args(["--checkpoint", str(runs[0]), str(runs[1]), "--data-root",
                                                   str(training_root), "--split", "test", "--out", str(skipped),
                                                   "--device", "cpu", "--no-figures", "--no-hd95",
                                                   "--no-postprocessing"]))
    assert code == 0
    assert json.loads((skipped / "summary.json").read_text())["postprocessing"]["largest_component"] == []
    assert all(line.endswith(",none") for line in (skipped / "metrics.csv").read_text().splitlines()[1:])
