"""predict.py: per-class Dice and HD95 against hand-computed answers, the summary, the geometry
round trip back to a non-RAS anisotropic source grid, and a real train -> predict CLI run on a
tiny phantom that checks every file both scripts write.

Everything runs on the CPU with real NIfTI files in temporary folders; nothing of the project is
mocked. The CLI tests start ``train.py`` and ``predict.py`` as subprocesses, as a user would; the
further predict runs call the same entry point in-process (``run_cli(main, get_args(argv))``,
whose return value is the exit code) to keep the suite fast.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import unquote
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

from pelvicseg import phantom  # noqa: E402
from dataset import CLASS_NAMES, find_cases, preprocessing  # noqa: E402
import predict  # noqa: E402
from pelvicseg.inference import labels_from_probabilities, to_source_grid, write_prediction  # noqa: E402
from pelvicseg.metrics import dice_per_class, hd95_per_class, misses_per_class, summarise  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402

NUM_CLASSES = len(CLASS_NAMES)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_TIMEOUT_S = 300
PREDICT_TIMEOUT_S = 240


# ----------------------------------------------------------------------------- helpers

def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1,
               dtype=None) -> Path:
    image = nib.Nifti1Image(np.asarray(array), affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def affine_for(axcodes: tuple[str, str, str], spacing: tuple[float, float, float],
               origin=(12.5, -40.0, 7.25)) -> np.ndarray:
    """An affine whose array axis i steps ``spacing[i]`` mm towards ``axcodes[i]`` (RAS world)."""
    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, code in enumerate(axcodes):
        row, sign = world[code]
        affine[row, axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    assert nib.aff2axcodes(affine) == tuple(axcodes)
    return affine


def to_lps(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """nibabel's own reorientation to LPS: the reference the loader must agree with."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt("LPS"))
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))


def blocks_label(shape: tuple[int, int, int]) -> np.ndarray:
    """All six classes as asymmetric blocks, so any flip or axis swap changes the array."""
    x, y, z = shape
    label = np.zeros(shape, dtype=np.uint8)
    label[1:x - 1, 1:y - 1, 1:z - 1] = 1
    label[2:6, 2:5, 2:4] = 2
    label[x - 6:x - 2, 3:7, 3:7] = 3
    label[4:9, y - 6:y - 2, 2:5] = 4
    label[7:10, 5:8, z - 4:z - 1] = 5
    return label


def run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Output decoded by hand: text mode's universal newlines would turn a progress bar's carriage
    returns into newlines and hide them. The user's environment without PYTHONWARNINGS."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, timeout=timeout,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def predict_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """predict.py's CLI without the interpreter start: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("error:"), explain(result)
    return error_lines[0]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


# ----------------------------------------------------------------------------- Dice

def test_dice_perfect_prediction_is_one_for_present_classes_and_nan_for_absent():
    target = np.zeros((4, 4, 4), dtype=np.uint8)
    target[:2] = 1
    target[2:, :2] = 3
    dice = dice_per_class(target.copy(), target, NUM_CLASSES)
    np.testing.assert_array_equal(dice[[0, 1, 3]], [1.0, 1.0, 1.0])
    assert np.isnan(dice[[2, 4, 5]]).all()  # absent from both: NaN, never 1.0


def test_dice_disjoint_masks_score_zero():
    target = np.zeros((2, 3, 4), dtype=np.uint8)
    prediction = np.zeros_like(target)
    target[0] = 1
    prediction[1] = 1
    dice = dice_per_class(prediction, target, 2)
    assert dice[0] == 0.0 and dice[1] == 0.0


def test_dice_empty_vs_empty_is_nan_and_empty_truth_with_prediction_is_zero():
    target = np.zeros((3, 3, 3), dtype=np.uint8)
    prediction = target.copy()
    prediction[0, 0, 0] = 5  # predicted prostate where there is none
    dice = dice_per_class(prediction, target, NUM_CLASSES)
    assert np.isnan(dice[4])  # rectum: empty in both
    assert dice[5] == 0.0  # prostate: empty truth, non-empty prediction
    assert dice[0] == pytest.approx(2 * 26 / (26 + 27))


def test_dice_partial_overlap_matches_hand_count():
    # class 1: 4 predicted voxels, 5 true voxels, 3 shared -> 2*3/(4+5)
    target = np.zeros(12, dtype=np.int64)
    prediction = np.zeros(12, dtype=np.int64)
    target[[0, 1, 2, 3, 4]] = 1
    prediction[[1, 2, 3, 9]] = 1
    dice = dice_per_class(prediction.reshape(2, 3, 2), torch.as_tensor(target.reshape(2, 3, 2)), 2)
    assert dice[1] == pytest.approx(2 * 3 / (4 + 5))
    # class 0: 8 predicted, 7 true, 6 shared
    assert dice[0] == pytest.approx(2 * 6 / (8 + 7))


# ----------------------------------------------------------------------------- HD95

SPACING = (0.9, 2.5, 1.3)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_hd95_of_shifted_cube_is_shift_times_that_axis_spacing(axis, shift):
    target = np.zeros((20, 20, 20), dtype=np.uint8)
    target[5:13, 5:13, 5:13] = 1
    box = [slice(5, 13)] * 3
    box[axis] = slice(5 + shift, 13 + shift)
    prediction = np.zeros_like(target)
    prediction[tuple(box)] = 1
    hd95 = hd95_per_class(prediction, target, 2, SPACING)
    # every spacing differs, so a swapped or reversed spacing gives a different number
    assert hd95[1] == pytest.approx(shift * SPACING[axis], rel=1e-5)
    assert hd95_per_class(target, prediction, 2, SPACING)[1] == pytest.approx(shift * SPACING[axis], rel=1e-5)


def test_hd95_is_zero_for_identical_masks_and_nan_where_a_mask_is_empty():
    target = np.zeros((10, 10, 10), dtype=np.uint8)
    target[2:6, 2:6, 2:6] = 1
    target[7:9, 7:9, 7:9] = 2
    prediction = target.copy()
    prediction[prediction == 2] = 0  # class 2 missed entirely
    prediction[0, 0, 0] = 3  # class 3 predicted where there is none
    hd95 = hd95_per_class(prediction, target, 5, SPACING)
    assert hd95[1] == pytest.approx(0.0)
    assert np.isnan(hd95[2])  # empty prediction
    assert np.isnan(hd95[3])  # empty ground truth
    assert np.isnan(hd95[4])  # empty in both


# ----------------------------------------------------------------------------- summary

def test_summarise_skips_nan_and_leaves_background_out_of_foreground_mean():
    names = ["background", "body", "bone", "bladder"]
    dice = np.array([[0.9, 0.8, np.nan, np.nan],
                     [0.7, 0.6, 0.5, np.nan],
                     [0.5, np.nan, 0.1, np.nan]])
    hd95 = np.array([[1.0, 2.0, np.nan, np.nan],
                     [3.0, 4.0, 6.0, np.nan],
                     [5.0, np.nan, np.nan, np.nan]])
    misses = np.array([[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    summary = summarise(dice, hd95, misses, names, "runs/x/best.pt")
    assert set(summary) == {"per_class_dice", "per_class_dice_std", "mean_foreground_dice", "per_class_hd95",
                            "per_class_hd95_std", "per_class_misses", "n_cases", "checkpoint", "postprocessing"}
    assert summary["per_class_misses"] == {"background": 0, "body": 1, "bone": 1, "bladder": 0}
    assert summary["per_class_dice"]["background"] == pytest.approx(0.7)
    assert summary["per_class_dice"]["body"] == pytest.approx(0.7)  # NaN left out, not counted as 0 or 1
    assert summary["per_class_dice"]["bone"] == pytest.approx(0.3)
    assert summary["per_class_dice"]["bladder"] is None  # absent everywhere
    assert summary["per_class_dice_std"]["body"] == pytest.approx(0.1)
    assert summary["per_class_dice_std"]["bone"] == pytest.approx(0.2)
    # foreground mean over body and bone only: background and the all-NaN bladder are out
    assert summary["mean_foreground_dice"] == pytest.approx((0.7 + 0.3) / 2)
    assert summary["per_class_hd95"]["body"] == pytest.approx(3.0)
    assert summary["per_class_hd95"]["bone"] == pytest.approx(6.0)
    assert summary["per_class_hd95"]["bladder"] is None
    assert summary["n_cases"] == 3
    assert summary["checkpoint"] == "runs/x/best.pt"
    json.dumps(summary, allow_nan=False)  # plain JSON: no NaN leaks into summary.json


def test_misses_count_organs_missed_or_invented_by_hand():
    target = np.zeros((6, 6, 6), dtype=np.uint8)
    target[1:3, 1:3, 1:3] = 1  # body present in both
    target[4, 4, 4] = 2  # bone in the truth only: missed
    prediction = np.zeros_like(target)
    prediction[1:3, 1:3, 1:4] = 1
    prediction[0, 5, 5] = 3  # bladder predicted where there is none
    assert misses_per_class(prediction, target, 5).tolist() == [0, 0, 1, 1, 0]
    # and HD95 cannot score either of them, which is why they are counted
    hd95 = hd95_per_class(prediction, target, 5, (1.0, 1.0, 1.0))
    assert np.isnan(hd95[2]) and np.isnan(hd95[3]) and np.isfinite(hd95[1])


def test_summarise_with_no_foreground_gives_none():
    summary = summarise(np.array([[0.9, np.nan]]), np.array([[1.0, np.nan]]), np.zeros((1, 2)), ["background", "body"],
                        "c.pt")
    assert summary["mean_foreground_dice"] is None
    assert summary["per_class_dice"]["background"] == pytest.approx(0.9)


# ----------------------------------------------------------------------------- geometry

SOURCE_SHAPE = (14, 12, 10)


@pytest.fixture(params=[("S", "R", "A"), ("L", "A", "I")], ids=["SRA", "LAI"])
def non_ras_case(request, tmp_path):
    """Image and label stored with permuted/flipped axes and spacing (0.9, 2.5, 1.3) mm, qform
    code 1 and sform code 2 (so code handling shows); the image on disk is int16 with scaling."""
    affine = affine_for(request.param, SPACING)
    label = blocks_label(SOURCE_SHAPE)
    rng = np.random.default_rng(0)
    image = (label * 100.0 + 50.0 + rng.normal(0, 5, SOURCE_SHAPE)).astype(np.float32)
    image_path = save_nifti(tmp_path / "image.nii.gz", image, affine, 1, 2, dtype=np.int16)
    label_path = save_nifti(tmp_path / "label.nii.gz", label, affine, 1, 2)
    return {"image": str(image_path), "label": str(label_path), "affine": affine, "label_array": label,
            "axcodes": request.param}


def one_hot(label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(label.long(), NUM_CLASSES).permute(3, 0, 1, 2).float()


def lps_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """The source's voxel size in LPS axis order, by hand from the test's own affine."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for axis in range(3):
        spacing[int(np.argmax(np.abs(affine[:3, axis])))] = float(zooms[axis])  # x, y, z world rows
    return tuple(spacing)


def test_preprocessed_label_at_own_spacing_is_nibabel_lps_reorientation_and_inverts_exactly(non_ras_case):
    lps_label = to_lps(non_ras_case["label_array"], non_ras_case["affine"])
    assert not np.array_equal(lps_label, non_ras_case["label_array"])  # reorienting is not a no-op
    transform = preprocessing(lps_spacing(non_ras_case["affine"]), NUM_CLASSES)
    item = transform({"image": non_ras_case["image"], "label": non_ras_case["label"]})
    preprocessed = item["label"].as_tensor()[0]
    np.testing.assert_array_equal(preprocessed.numpy(), lps_label)  # LPS, no resampling at its own spacing
    back = labels_from_probabilities(to_source_grid(one_hot(preprocessed), item["image"]))
    assert back.shape == SOURCE_SHAPE
    np.testing.assert_array_equal(back, non_ras_case["label_array"])  # Dice 1.0 for every class


def test_finer_spacing_returns_to_source_grid_almost_exactly(non_ras_case):
    spacing = lps_spacing(non_ras_case["affine"])
    lps_shape = to_lps(non_ras_case["label_array"], non_ras_case["affine"]).shape
    transform = preprocessing([s / 1.5 for s in spacing], NUM_CLASSES)  # resampled up, then back down
    item = transform({"image": non_ras_case["image"], "label": non_ras_case["label"]})
    assert tuple(item["image"].shape[1:]) == tuple(int(round(1.5 * n)) for n in lps_shape)
    back = labels_from_probabilities(to_source_grid(one_hot(item["label"].as_tensor()[0]), item["image"]))
    assert back.shape == SOURCE_SHAPE
    agreement = float((back == non_ras_case["label_array"]).mean())
    assert agreement > 0.99, f"only {agreement:.4f} of voxels agree after the round trip"
    for c in range(NUM_CLASSES):  # every class survives, in the right place
        assert dice_per_class(back, non_ras_case["label_array"], NUM_CLASSES)[c] > 0.95


def test_twice_coarser_spacing_returns_within_one_coarse_voxel_of_a_border(non_ras_case):
    """At 2x coarser voxels the round trip can only be exact away from organ borders: every voxel
    that differs must lie within one coarse voxel (two source voxels) of a border in the original
    labels. Labels are resampled as one-hot masks averaged over each coarse voxel, so a coarse
    voxel takes its majority class and a block a single class wins loses its other voxels: up to
    one coarse voxel from the border (tests/test_engine.py checks that this reaches the one-hot
    bound)."""
    label = non_ras_case["label_array"]
    spacing = lps_spacing(non_ras_case["affine"])
    item = preprocessing([2 * s for s in spacing], NUM_CLASSES)({"image": non_ras_case["image"],
                                                                   "label": non_ras_case["label"]})
    back = labels_from_probabilities(to_source_grid(one_hot(item["label"].as_tensor()[0]), item["image"]))
    assert back.shape == SOURCE_SHAPE
    padded = np.pad(label, 1, mode="edge")
    near_border = np.zeros(label.shape, dtype=bool)
    for shift in np.ndindex(3, 3, 3):  # a voxel is on a border if any of its 26 neighbours differs
        window = padded[shift[0]:shift[0] + label.shape[0], shift[1]:shift[1] + label.shape[1],
                        shift[2]:shift[2] + label.shape[2]]
        near_border |= window != label
    near_border = ndimage.binary_dilation(near_border, np.ones((3, 3, 3), dtype=bool))  # and one voxel beyond
    wrong = back != label
    assert wrong.any()  # 2x coarser is not lossless on these small blocks
    assert not (wrong & ~near_border).any(), f"{int((wrong & ~near_border).sum())} voxels wrong away from borders"


def test_write_prediction_keeps_source_geometry_codes_and_writes_uint8(non_ras_case, tmp_path):
    source = nib.load(non_ras_case["image"])
    assert source.get_data_dtype() == np.int16 and source.dataobj.slope != 1.0  # scaled storage
    labels = non_ras_case["label_array"]
    out = tmp_path / "out" / "case_pred.nii.gz"
    out.parent.mkdir()
    write_prediction(labels, source, out)
    written = nib.load(out)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert written.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine) == non_ras_case["axcodes"]
    data = np.asanyarray(written.dataobj)
    assert data.dtype == np.uint8  # no scaling left over from the int16 source header
    np.testing.assert_array_equal(data, labels)


# ----------------------------------------------------------------------------- CLI: train -> predict

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """5 patients x 2 weeks of phantom (split 3:1:1 by patient), one epoch of a tiny network."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "data"
    phantom.write_phantom(data, patients=5, weeks=2, shape=(20, 18, 12), seed=0)
    run_dir = base / "run"
    result = run(["train.py", "--data-root", str(data), "--out", str(run_dir), "--epochs", "1",
                  "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0",
                  "--device", "cpu"], TRAIN_TIMEOUT_S)
    assert result.returncode == 0, explain(result)
    return {"base": base, "data": data, "run": run_dir, "stdout": result.stdout, "result": result}


@pytest.fixture(scope="module")
def predicted(trained):
    out = trained["base"] / "predictions"
    result = run(["predict.py", "--checkpoint", str(trained["run"] / "best.pt"), "--data-root", str(trained["data"]),
                  "--split", "test", "--out", str(out), "--device", "cpu"], PREDICT_TIMEOUT_S)
    assert result.returncode == 0, explain(result)
    split = json.loads((trained["run"] / "splits.json").read_text())
    cases = [c for c in find_cases(trained["data"]) if c.patient in split["test"]]
    return {"out": out, "cases": cases, "result": result}


def test_a_normal_run_prints_no_library_warnings_and_no_progress_frames(trained, predicted):
    """The train.py and predict.py runs above, as a user starts them (figures and HD95 included)."""
    for name, result in (("train", trained["result"]), ("predict", predicted["result"])):
        assert "Warning" not in result.stderr, f"{name}.py:\n{result.stderr[-3000:]}"
        assert "warn" not in result.stderr.lower(), f"{name}.py:\n{result.stderr[-3000:]}"
        # Not on a terminal: no tqdm bars, whose frames are carriage returns.
        assert "\r" not in result.stdout + result.stderr, f"{name}.py writes progress frames"
    assert "Done." in trained["result"].stdout and "Outputs in" in predicted["result"].stdout


def test_train_writes_run_folder_and_a_complete_checkpoint(trained):
    run_dir = trained["run"]
    for name in ("config.json", "splits.json", "metrics.csv", "training_curves.png", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), f"{name} missing from the run folder"
    assert_png(run_dir / "training_curves.png")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["spatial_size"] == [16, 16, 16] and config["channels"] == [4, 8, 8, 8]
    split = json.loads((run_dir / "splits.json").read_text())
    parts = [set(split[p]) for p in ("train", "val", "test")]
    assert [len(p) for p in parts] == [3, 1, 1]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])

    header, rows = read_csv(run_dir / "metrics.csv")
    assert header[:12] == ["epoch", "train_loss", "val_loss", "dice_background", "dice_body", "dice_bone",
                           "dice_bladder", "dice_rectum", "dice_prostate", "mean_fg_dice", "lr", "seconds"]
    assert [r["epoch"] for r in rows] == ["1"]
    assert math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(float(rows[0]["val_loss"]))

    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    for key in ("model", "model_args", "config", "class_names", "split", "epoch", "best_metric"):
        assert key in state, f"best.pt lacks {key}"
    # best.pt is what users keep and share: weights and settings, not the optimizer's moments
    assert not {"optimizer", "scaler", "rng"} & set(state)
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scaler", "epoch", "epochs_without_improvement", "rng"):
        assert key in last, f"last.pt lacks {key}"
    assert (run_dir / "best.pt").stat().st_size < 0.5 * (run_dir / "last.pt").stat().st_size
    assert state["config"]["spacing"] == last["config"]["spacing"] and len(state["config"]["spacing"]) == 3
    assert "median training field of view" in state["config"]["spacing_source"]
    assert state["model_args"]["channels"] == [4, 8, 8, 8]
    assert state["model_args"]["out_channels"] == NUM_CLASSES
    assert state["config"]["spatial_size"] == [16, 16, 16]
    assert state["epoch"] == 1 and last["epochs_without_improvement"] == 0
    assert state["best_metric"] == pytest.approx(float(rows[0]["mean_fg_dice"]), rel=1e-4, abs=1e-6)
    assert state["split"] == split
    assert not list(run_dir.glob(".partial-*")), "temporary checkpoint files left behind"


def test_predict_cli_writes_predictions_metrics_summary_and_figures(predicted):
    out, cases = predicted["out"], predicted["cases"]
    assert len(cases) == 2  # one test patient, two weeks
    _, metric_rows = read_csv(out / "metrics.csv")
    for case in cases:
        prediction, source = nib.load(out / f"{case.case_id}_pred.nii.gz"), nib.load(case.image)
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        assert prediction.get_data_dtype() == np.uint8
        labels = np.asanyarray(prediction.dataobj)
        assert labels.max() < NUM_CLASSES
        # metrics.csv is computed from exactly the labels written to disk: Dice by hand in numpy
        target = np.asanyarray(nib.load(case.label).dataobj)
        expected = []
        for c in range(NUM_CLASSES):
            both, total = np.sum((labels == c) & (target == c)), np.sum(labels == c) + np.sum(target == c)
            expected.append(2.0 * both / total if total else math.nan)
        voxel_ml = float(np.prod(source.header.get_zooms()[:3])) / 1000
        rows = {r["class"]: r for r in metric_rows if r["case"] == case.case_id}
        assert list(rows) == list(CLASS_NAMES)
        for c, name in enumerate(CLASS_NAMES):
            written = float(rows[name]["dice"])
            assert (math.isnan(written) and math.isnan(expected[c])) or written == pytest.approx(expected[c], rel=1e-5)
            assert float(rows[name]["gt_volume_ml"]) == pytest.approx((target == c).sum() * voxel_ml, rel=1e-5)
            assert float(rows[name]["pred_volume_ml"]) == pytest.approx((labels == c).sum() * voxel_ml, rel=1e-5)
        assert_png(out / "figures" / f"{case.case_id}_best_slices.png")
        assert_png(out / "figures" / f"{case.case_id}_overview.png")
    header, _ = read_csv(out / "metrics.csv")
    assert header == ["case", "class", "dice", "hd95", "missed", "gt_volume_ml", "pred_volume_ml", "uncertainty",
                      "flagged", "postprocessing"]
    assert len(metric_rows) == len(cases) * NUM_CLASSES
    summary = json.loads((out / "summary.json").read_text())
    assert {"per_class_dice", "per_class_dice_std", "mean_foreground_dice", "per_class_hd95", "per_class_misses",
            "n_cases", "checkpoint", "postprocessing"} <= set(summary)
    assert summary["n_cases"] == len(cases)
    assert set(summary["per_class_dice"]) == set(CLASS_NAMES)
    assert_png(out / "figures" / "dice_boxplot.png")
    assert (out / "predict_config.json").is_file()


def test_predict_refuses_to_replace_outputs_without_overwrite_then_overwrites(trained, predicted, tmp_path, capsys):
    # a copy: the shared predictions (with figures) stay as the other tests read them
    out = tmp_path / "predictions"
    shutil.copytree(predicted["out"], out)
    before = mtimes(out)
    command = ["predict.py", "--checkpoint", str(trained["run"] / "best.pt"), "--data-root", str(trained["data"]),
               "--split", "test", "--out", str(out), "--device", "cpu", "--no-hd95"]
    refused = run(command, PREDICT_TIMEOUT_S)
    line = assert_one_line_error(refused)
    assert "--overwrite" in line
    assert mtimes(out) == before, "a refused run touched files in --out"

    code, stdout, stderr = predict_in_process(command[1:] + ["--overwrite", "--no-figures"], capsys)
    assert code == 0, stdout + stderr
    after = mtimes(out)
    for case in predicted["cases"]:
        name = f"{case.case_id}_pred.nii.gz"
        assert after[name] != before[name], f"{name} was not rewritten with --overwrite"
    assert after["metrics.csv"] != before["metrics.csv"]


def test_predict_single_unlabelled_non_ras_file_matches_the_lps_prediction(trained, predicted, tmp_path, capsys):
    """--input on one file without a label: a prediction, no metrics. The file is a test case
    stored with permuted and flipped axes; the network sees the same LPS volume, so the written
    labels, turned back to the stored LPS order, must equal the data-root run's prediction."""
    case = predicted["cases"][0]
    lps_source = nib.load(case.image)
    ornt = nib.orientations.axcodes2ornt(("S", "R", "A"))
    reoriented = lps_source.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(lps_source.affine), ornt))
    scan = tmp_path / "scans" / "scan.nii.gz"
    scan.parent.mkdir()
    nib.save(reoriented, str(scan))
    out = tmp_path / "single"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["run"] / "best.pt"), "--input", str(scan),
                                               "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, stdout + stderr
    prediction = nib.load(out / "scan_pred.nii.gz")
    assert prediction.shape == reoriented.shape != lps_source.shape
    np.testing.assert_allclose(prediction.affine, reoriented.affine, atol=1e-5)
    assert nib.aff2axcodes(prediction.affine) == ("S", "R", "A")
    # without labels: volumes, uncertainty and a report, but no Dice
    header, rows = read_csv(out / "metrics.csv")
    assert "dice" not in header and {"pred_volume_ml", "uncertainty", "flagged"} <= set(header)
    voxel_ml = float(np.prod(reoriented.header.get_zooms()[:3])) / 1000
    written_labels = np.asanyarray(prediction.dataobj)
    for row in rows:
        c = CLASS_NAMES.index(row["class"])
        assert float(row["pred_volume_ml"]) == pytest.approx((written_labels == c).sum() * voxel_ml, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 0 and summary["n_predicted"] == 1 and "per_class_dice" not in summary
    uncertainty = nib.load(out / "scan_uncertainty.nii.gz")
    assert uncertainty.shape == reoriented.shape
    np.testing.assert_allclose(uncertainty.affine, reoriented.affine, atol=1e-5)
    assert (out / "report.html").is_file()
    assert_png(out / "figures" / "scan_best_slices.png")
    reference = np.asanyarray(nib.load(predicted["out"] / f"{case.case_id}_pred.nii.gz").dataobj)
    back_to_lps = prediction.as_reoriented(nib.orientations.ornt_transform(
        ornt, nib.orientations.io_orientation(lps_source.affine)))
    np.testing.assert_array_equal(np.asanyarray(back_to_lps.dataobj), reference)


def test_predict_refuses_an_out_folder_inside_the_data_root(trained, capsys):
    for out in (trained["data"] / "predictions", trained["data"] / "semantic_MRs_anon"):
        code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["run"] / "best.pt"), "--data-root",
                                                   str(trained["data"]), "--split", "test", "--out", str(out),
                                                   "--device", "cpu"], capsys)
        assert code == 2, stdout + stderr
        error_lines = [line for line in stderr.splitlines() if "error:" in line]
        assert len(error_lines) == 1 and error_lines[0].startswith("error:") and "inside the input folder" in stderr
        assert not (trained["data"] / "predictions").exists()
        assert not list((trained["data"] / "semantic_MRs_anon").glob("*_pred.nii.gz"))


def test_predict_cli_dice_on_a_hand_made_label_is_the_known_answer(trained, predicted, tmp_path, capsys):
    """A label made from the written prediction by moving half of its largest class's voxels (P) to
    another class j: the prediction is the same again, so the largest class must score
    2 (P/2) / (P + P/2) = 2/3 exactly, class j 2 Pj / (2 Pj + P/2), every other predicted class 1.0
    and a class in neither NaN."""
    case = predicted["cases"][0]
    prediction = nib.load(predicted["out"] / f"{case.case_id}_pred.nii.gz")
    labels = np.asanyarray(prediction.dataobj).copy()
    counts = np.bincount(labels.reshape(-1), minlength=NUM_CLASSES)
    largest = int(np.argmax(counts))
    other = (largest + 1) % NUM_CLASSES
    voxels = np.flatnonzero(labels.reshape(-1) == largest)
    moved = voxels[::2]
    label = labels.reshape(-1).copy()
    label[moved] = other
    root = tmp_path / "handmade"
    image_path = root / "semantic_MRs_anon" / "Case_099_Week0_LFOV.nii.gz"
    label_path = root / "semantic_labels_anon" / "Case_099_Week0_SEMANTIC_LFOV.nii.gz"
    image_path.parent.mkdir(parents=True)
    image_path.write_bytes(Path(case.image).read_bytes())
    save_nifti(label_path, label.reshape(labels.shape).astype(np.uint8), prediction.affine)
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["run"] / "best.pt"), "--input", str(root),
                                               "--out", str(out), "--device", "cpu", "--no-figures", "--no-hd95"],
                                              capsys)
    assert code == 0, stdout + stderr
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "Case_099_Week0_pred.nii.gz").dataobj), labels)
    _, rows = read_csv(out / "metrics.csv")
    dice = {r["class"]: float(r["dice"]) for r in rows}
    total, kept = voxels.size, voxels.size - moved.size
    assert dice[CLASS_NAMES[largest]] == pytest.approx(2 * kept / (total + kept), rel=1e-6)
    assert dice[CLASS_NAMES[other]] == pytest.approx(2 * counts[other] / (2 * counts[other] + moved.size), rel=1e-6)
    for c, name in enumerate(CLASS_NAMES):
        if c in (largest, other):
            continue
        if counts[c]:
            assert dice[name] == pytest.approx(1.0), name
        else:
            assert math.isnan(dice[name]), name


def test_predict_input_folder_keeps_same_named_files_apart_and_skips_labels(trained, tmp_path, capsys):
    """Outside HipMRI naming: scan.nii.gz in two folders gives two outputs, and label files are
    not predicted as images."""
    case = find_cases(trained["data"])[0]
    root = tmp_path / "scans"
    for folder in ("site_a", "site_b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "scan.nii.gz").write_bytes(Path(case.image).read_bytes())
    (root / "site_a" / "scan_label.nii.gz").write_bytes(Path(case.label).read_bytes())
    (root / "labels").mkdir()
    (root / "labels" / "scan.nii.gz").write_bytes(Path(case.label).read_bytes())
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["run"] / "best.pt"), "--input", str(root),
                                               "--out", str(out), "--device", "cpu", "--no-figures"], capsys)
    assert code == 0, stdout + stderr
    written = sorted(p.name for p in out.glob("*_pred.nii.gz"))
    assert written == ["site_a__scan_pred.nii.gz", "site_b__scan_pred.nii.gz"]


class ReportParser(HTMLParser):
    """Every link and image of report.html, and each case's per-organ numbers (their exact values)."""

    def __init__(self):
        super().__init__()
        self.references, self.numbers, self.case, self.organ = [], {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key):
                self.references.append(attrs[key])
        if tag == "tr" and "data-case" in attrs:
            self.case = attrs["data-case"]
        if tag == "tr" and "data-organ" in attrs:
            self.organ = attrs["data-organ"]
        if tag == "td" and "data-metric" in attrs and self.case and self.organ:
            self.numbers[(self.case, self.organ, attrs["data-metric"])] = attrs.get("title", "")


def test_report_and_uncertainty_of_a_labelled_run_agree_with_the_files(predicted):
    out, cases = predicted["out"], predicted["cases"]
    for case in cases:
        uncertainty, source = nib.load(out / f"{case.case_id}_uncertainty.nii.gz"), nib.load(case.image)
        assert uncertainty.shape == source.shape
        np.testing.assert_allclose(uncertainty.affine, source.affine, atol=1e-5)
        assert uncertainty.get_data_dtype() == np.uint8  # stored compactly
        values = np.asanyarray(uncertainty.dataobj)
        assert values.max() > values.min()  # a map, not a constant
    parser = ReportParser()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert parser.references
    assert any(r.startswith("data:image/png;base64,") for r in parser.references)  # figures are embedded
    for reference in (unquote(r) for r in parser.references if not r.startswith(("#", "data:"))):
        assert "://" not in reference, f"report.html reaches the network: {reference}"
        target = Path(reference) if Path(reference).is_absolute() else out / reference
        assert target.exists(), f"report.html references a missing file: {reference}"
    _, rows = read_csv(out / "metrics.csv")
    compared = 0
    for row in rows:
        for metric in ("dice", "hd95", "pred_volume_ml", "gt_volume_ml", "uncertainty"):
            key = (row["case"], row["class"], metric)
            if row["class"] == "background" or key not in parser.numbers:
                continue
            expected = "" if row[metric] == "nan" else row[metric]
            assert parser.numbers[key] == expected, key
            compared += 1
    assert compared >= len(cases) * 5 * 4  # every organ's Dice, HD95, volumes and uncertainty were there
    summary = json.loads((out / "summary.json").read_text())
    flagged_rows = {(r["case"], r["class"]) for r in rows if r["flagged"] == "1"}
    assert {(f["case"], f["organ"]) for f in summary["flagged"]} == flagged_rows


def test_prediction_on_a_dicom_series_equals_prediction_on_its_nifti(trained, predicted, tmp_path, capsys):
    """The same test case as an MR series (phantom's writer, files in shuffled names): the NIfTI
    prediction, the RTSTRUCT read back by an independent reader and the SEG all equal the
    prediction made from the NIfTI file."""
    import pydicom
    from highdicom.seg import segread

    from pelvicseg.dicom import outputs as dicom_io

    case = predicted["cases"][0]
    source = nib.load(case.image)
    series_folder = tmp_path / "export" / "MR_series"
    files = phantom.write_dicom_series(np.asanyarray(source.dataobj).astype(np.float32), source.affine, series_folder,
                                       "Phantom_005", "T2 phantom")
    for number, file in enumerate(sorted(files, reverse=True)):  # names no longer follow the slice order
        Path(file).rename(series_folder / f"img{(number * 7) % len(files):04d}.dcm")
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["run"] / "best.pt"), "--input",
                                               str(series_folder.parent), "--out", str(out), "--device", "cpu",
                                               "--no-figures", "--output-format", "nifti", "rtstruct", "seg"], capsys)
    assert code == 0, stdout + stderr
    reference = np.asanyarray(nib.load(predicted["out"] / f"{case.case_id}_pred.nii.gz").dataobj)
    from_dicom = nib.load(out / "MR_series_pred.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(from_dicom.dataobj), reference)
    np.testing.assert_allclose(from_dicom.affine, source.affine, atol=1e-4)
    series = dicom_io.find_series(series_folder.parent)[0]
    rtstruct = pydicom.dcmread(out / "MR_series_rtstruct.dcm")
    assert rtstruct.FrameOfReferenceUID == series.frame_of_reference_uid
    masks = dicom_io.read_rtstruct_masks(out / "MR_series_rtstruct.dcm", series)
    for c, name in enumerate(CLASS_NAMES[2:], start=2):  # the body ROI is the outline, checked in test_dicom
        mask = masks.get(dicom_io.roi_name(name))  # TG-263 names; an organ without voxels is left out
        assert (mask is None) == (not (reference == c).any()), name
        if mask is not None:
            np.testing.assert_array_equal(mask, reference == c, err_msg=name)
    segmentation = segread(out / "MR_series_seg.dcm")
    assert segmentation.SeriesInstanceUID != series.series_uid  # its own series, referring to the MR one
    assert segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    # read again without the project's reader: contours and SEG frames by their own geometry
    import dicom_readback
    independent = dicom_readback.rtstruct_masks(out / "MR_series_rtstruct.dcm", source.affine, reference.shape)
    for c, name in enumerate(CLASS_NAMES[2:], start=2):
        mask = independent.get(dicom_io.roi_name(name))
        assert (mask is None) == (not (reference == c).any()), name
        if mask is not None:
            np.testing.assert_array_equal(mask, reference == c, err_msg=name)
    from_seg, _ = dicom_readback.seg_labels(out / "MR_series_seg.dcm", source.affine, reference.shape)
    np.testing.assert_array_equal(from_seg, reference)


def test_rtstruct_for_a_nifti_input_is_a_one_line_error(trained, predicted, tmp_path, capsys):
    case = predicted["cases"][0]
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["run"] / "best.pt"), "--input", case.image,
                                               "--out", str(tmp_path / "out"), "--device", "cpu",
                                               "--output-format", "rtstruct"], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "DICOM" in lines[0]
    assert not (tmp_path / "out").exists()
