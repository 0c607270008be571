"""The training engine: seeded loaders whose augmentation changes every epoch and differs between
workers, labels resampled onto their image's grid, one geometry (the affine), foreground-only
HD95, non-finite steps caught, resume after an early stop, and the review rule fitted on exactly
what predict.py thresholds. Real NIfTI files, the real loader, model and training loop."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import Dataset, MetaTensor, NibabelReader, image_reader

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg import training  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from conftest import synthetic_case, write_case, write_dataset, write_nifti  # noqa: E402
from dataset import (DataError, LoadValidated, augmentation, cached_dataset, find_cases, preprocessing,  # noqa: E402
                     voxel_volume_ml)
from pelvicseg.evaluation import evaluate_volume  # noqa: E402
from pelvicseg.metrics import hd95_per_class  # noqa: E402
from modules import ImprovedUNet3D  # noqa: E402

TIMEOUT_S = 300
TINY = ["--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def in_process(main, get_args, argv: list[str], capsys) -> tuple[int, str, str]:
    """A script's CLI without the interpreter start (its entry point returns the exit code):
    (exit code, stdout, stderr). For runs whose output is the script's own prints and files; the
    runs whose terminal output (log lines, one-line errors) is checked stay subprocesses."""
    capsys.readouterr()
    code = run_cli(main, get_args(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(batch: dict) -> str:
    hasher = hashlib.sha256()
    for key in ("image", "label"):
        hasher.update(torch.as_tensor(batch[key]).numpy().tobytes())
    return hasher.hexdigest()[:16]


# ----------------------------------------------------------------------------- loader seeding

@pytest.fixture(scope="module")
def six_copies(tmp_path_factory):
    """Six training items that are all the same volume: any difference between the batches is the
    augmentation's doing."""
    root = tmp_path_factory.mktemp("copies")
    write_case(root, 4, 0, shape=(32, 28, 24))
    case = find_cases(root)[0]
    cases = [case] * 6
    return cached_dataset(cases, (1.7, 1.7, 1.56), crop_indices=True)


def one_epoch(cache, epoch: int, seed: int = 0, workers: int = 2) -> list[str]:
    """Batches of one epoch from the loader train.py builds with --augment loader (every MONAI
    random transform in the workers), plus whether each worker ignored SIGTERM."""
    crop_ratios = [0.5] + [1.0] * 5
    transform = mt.Compose([augmentation((16, 16, 16), 6, crop_ratios, spatial_on_device=False),
                            mt.Lambda(lambda item: {**item, "sigterm_ignored": torch.tensor(
                                signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)})])
    loader = training.training_loader(Dataset(cache, transform=transform), 1, workers,
                                      training.epoch_seed(seed, epoch))
    batches = list(loader)
    if workers:
        assert all(bool(b["sigterm_ignored"].all()) for b in batches), "a loader worker did not ignore SIGTERM"
    return [digest(b) for b in batches]


def test_loaders_with_the_same_seed_draw_the_same_batches(six_copies):
    assert one_epoch(six_copies, 1) == one_epoch(six_copies, 1)


def test_consecutive_epochs_draw_different_augmentations(six_copies):
    first, second = one_epoch(six_copies, 1), one_epoch(six_copies, 2)
    assert not set(first) & set(second), "epoch 2 repeated a crop of epoch 1"


def test_the_two_workers_draw_different_augmentations(six_copies):
    batches = one_epoch(six_copies, 1)
    # batch i comes from worker i % 2: the same volume, so equal pairs would mean equal seeds
    assert batches[0::2] != batches[1::2]
    assert len(set(batches)) == len(batches), f"repeated crops within an epoch: {batches}"


def test_without_workers_the_epochs_still_differ_and_repeat(six_copies):
    first = one_epoch(six_copies, 1, workers=0)
    assert first == one_epoch(six_copies, 1, workers=0)
    assert first != one_epoch(six_copies, 2, workers=0)


def test_determinism_is_set_once_and_leaves_the_autotuner_on_unless_asked():
    import train

    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        train.set_up_determinism(0, False, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        train.set_up_determinism(0, True, torch.device("cuda"))
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


# ----------------------------------------------------------------------------- labels on the image's grid

def world_centroid(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.stack(np.nonzero(weights > 0)).astype(np.float64)
    w = weights[weights > 0].astype(np.float64)
    voxel = (index * w).sum(axis=1) / w.sum()
    return affine[:3, :3] @ voxel + affine[:3, 3]


@pytest.mark.parametrize("factor", [2.0, 3.0, 1.5, 0.75])
def test_a_centred_sphere_keeps_its_label_centroid_on_the_image_centroid(tmp_path, factor):
    shape, spacing = (48, 48, 36), (1.0, 1.0, 1.2)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.array(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    sphere = (((grid - centre) * spacing) ** 2).sum(-1) <= 12.0 ** 2
    image_path = write_nifti(tmp_path / "image.nii.gz", np.where(sphere, 100.5, 10.25).astype(np.float32), affine)
    label_path = write_nifti(tmp_path / "label.nii.gz", sphere.astype(np.uint8), affine)
    item = preprocessing([s * factor for s in spacing])({"image": str(image_path), "label": str(label_path)})
    new_affine = np.asarray(item["image"].affine, dtype=np.float64)
    image_centroid = world_centroid(item["image"][0].numpy(), new_affine)
    label_centroid = world_centroid((item["label"][0].numpy() == 1).astype(float), new_affine)
    assert np.abs(label_centroid - image_centroid).max() < 0.05, (label_centroid, image_centroid)
    # and both on the sphere's true centre, computed from the source affine
    true_centre = affine[:3, :3] @ centre + affine[:3, 3]
    assert np.abs(label_centroid - true_centre).max() < 0.05


def test_a_2x_round_trip_reaches_the_one_hot_bound(tmp_path):
    """The bound, computed here: average each class's mask over 2x2x2 blocks, arg-max, and
    repeat back. The project's 2x labels repeated back must reach it for every class."""
    shape = (48, 40, 32)
    image, label = synthetic_case(shape, seed=3)
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    write_nifti(tmp_path / "image.nii.gz", image, affine)
    write_nifti(tmp_path / "label.nii.gz", label, affine, dtype=np.uint8)
    item = preprocessing([2.0, 2.0, 3.0])({"image": str(tmp_path / "image.nii.gz"),
                                          "label": str(tmp_path / "label.nii.gz")})
    coarse = item["label"][0].numpy().astype(np.int64)
    assert coarse.shape == tuple(n // 2 for n in shape)

    def back(labels):
        return labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)

    blocks = np.stack([(label == c).reshape(24, 2, 20, 2, 16, 2).mean(axis=(1, 3, 5)) for c in range(6)])
    bound_labels = back(blocks.argmax(0))

    def dice(a, b, c):
        return 2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum())

    for c in range(1, 6):
        assert dice(back(coarse), label, c) >= dice(bound_labels, label, c) - 1e-9, f"class {c}"


# ----------------------------------------------------------------------------- one geometry

def nifti_with_forms(path: Path, data, sform: np.ndarray, qform: np.ndarray) -> Path:
    image = nib.Nifti1Image(np.asarray(data), sform)
    image.set_sform(sform, code=1)
    image.set_qform(qform, code=1)
    nib.save(image, str(path))
    return path


def test_a_file_whose_sform_and_qform_disagree_in_voxel_size_is_refused_in_one_line(tmp_path):
    image, label = synthetic_case((24, 20, 16))
    root = tmp_path / "data"
    write_dataset(root, patients=(4, 5, 6), weeks=(0,))
    bad_files = [root / "semantic_MRs_anon" / f"Case_{p:03d}_Week0_LFOV.nii.gz" for p in (4, 5, 6)]
    for bad in bad_files:  # every patient's, since a test patient's image is not read in training
        nifti_with_forms(bad, image, np.diag([-1.7, -1.7, 1.56, 1]), np.diag([-0.85, -0.85, 0.78, 1]))
    with pytest.raises(DataError) as error:
        LoadValidated(("image", "label"))({"image": str(bad)})
    message = str(error.value)
    assert message.startswith(str(bad)) and "sform and qform disagree" in message and "\n" not in message
    result = run("train.py", "--data-root", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY)
    assert result.returncode == 2, explain(result)
    line = result.stderr.strip()
    assert "\n" not in line and "sform and qform disagree" in line, explain(result)
    assert any(line.startswith(f"error: {bad}:") for bad in bad_files), line
    assert not (tmp_path / "run").exists(), "a failed start left its run folder behind"


def test_the_affine_is_the_one_geometry_and_monai_header_fix_up_still_runs(tmp_path, monkeypatch):
    """Only the sform set (qform code 0) and a stale pixdim: MONAI's reader alone would replace
    the sform with a qform built from pixdim. The project's reader keeps nibabel's affine, still
    calls MONAI's fix-up, and volume and HD95 come from the affine."""
    affine = np.diag([-2.0, -1.0, 1.5, 1.0])
    label = np.zeros((20, 16, 12), dtype=np.uint8)
    label[4:10, 4:10, 3:8] = 1
    image = nib.Nifti1Image(label, affine)
    image.set_sform(affine, code=1)
    image.set_qform(None, code=0)
    image.header["pixdim"][1:4] = (1.0, 1.0, 1.0)
    path = tmp_path / "label.nii.gz"
    nib.save(image, str(path))
    source = nib.load(str(path))
    assert np.allclose(source.affine, affine) and tuple(source.header.get_zooms()) == (1.0, 1.0, 1.0)
    monai_reader = NibabelReader()
    monai_alone = monai_reader.get_data(monai_reader.read(str(path)))[1]["affine"]
    assert not np.allclose(np.asarray(monai_alone), affine), "MONAI's reader no longer rewrites this header"

    calls = []
    original = image_reader.correct_nifti_header_if_necessary
    monkeypatch.setattr(image_reader, "correct_nifti_header_if_necessary",
                        lambda img: calls.append(1) or original(img))
    loaded = LoadValidated(("image",)).load(str(path))
    assert calls, "MONAI's header fix-up was not called"
    assert np.allclose(np.asarray(loaded.affine), affine)
    assert voxel_volume_ml(source.affine) == pytest.approx(2.0 * 1.0 * 1.5 / 1000)

    # evaluate_volume on a prediction shifted 2 voxels along axis 0 (2 mm each by the affine)
    prediction = np.roll(label, 2, axis=0)
    probabilities = torch.from_numpy(np.stack([(prediction == c) for c in range(2)]).astype(np.float32))
    grid = MetaTensor(torch.zeros(1, *label.shape), affine=torch.as_tensor(affine),
                      meta={"original_affine": affine, "spatial_shape": np.array(label.shape)})
    result = evaluate_volume(probabilities, grid, source, ["background", "organ"], target=label)
    assert np.array_equal(result["labels"], prediction)
    assert result["hd95"][1] == pytest.approx(4.0)
    assert math.isnan(result["hd95"][0]), "HD95 of the background is not computed"
    assert result["pred_volume_ml"][1] == pytest.approx(label.sum() * 3.0 / 1000)
    assert result["gt_volume_ml"][1] == pytest.approx(label.sum() * 3.0 / 1000)


def test_hd95_is_for_the_foreground_only_by_hand():
    target = np.zeros((16, 16, 16), dtype=np.uint8)
    target[4:10, 4:10, 4:10] = 1
    prediction = np.roll(target, 3, axis=2)
    hd95 = hd95_per_class(prediction, target, 2, (1.0, 1.0, 0.5))
    assert math.isnan(hd95[0]) and hd95[1] == pytest.approx(1.5)


# ----------------------------------------------------------------------------- non-finite steps

def test_a_non_finite_step_is_skipped_and_the_next_finite_one_trains():
    torch.manual_seed(0)
    model = ImprovedUNet3D(channels=(4, 8, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = training.Trainer(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                               training.make_loss("combined", torch.ones(6)), "combined", None)
    images, labels = torch.rand(1, 1, 16, 16, 16), torch.randint(0, 6, (1, 1, 16, 16, 16)).float()
    before = [p.detach().clone() for p in model.parameters()]
    step = trainer.step(torch.full_like(images, float("nan")), labels)
    assert step.skipped and math.isnan(step.loss) and trainer.nonfinite_in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a skipped step changed the weights"
    step = trainer.step(images, labels)
    assert not step.skipped and math.isfinite(step.loss) and trainer.nonfinite_in_a_row == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_run_driven_to_nan_stops_in_one_line_and_its_best_pt_still_predicts(tmp_path, capsys):
    root = write_dataset(tmp_path / "data", patients=(4, 5, 6, 7, 8), weeks=(0, 1))
    run_dir = tmp_path / "run"
    code, stdout, stderr = in_process(train.main, train.get_args, ["--data-root", str(root), "--out", str(run_dir),
                                                                   "--epochs", "1", *TINY], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    best_bytes = (run_dir / "best.pt").read_bytes()
    # Weights thrown to 1e30: every forward pass of the next epoch overflows to NaN.
    state = load_checkpoint(run_dir / "last.pt")
    state["model"] = {k: (v * 1e30 if k.endswith("conv1.weight") else v) for k, v in state["model"].items()}
    save_checkpoint(state, run_dir / "last.pt")
    result = run("train.py", "--out", str(run_dir), "--resume", "--epochs", "3")
    assert result.returncode == 2, explain(result)
    line = result.stderr.strip()
    assert "\n" not in line and "epoch 2:" in line and "non-finite" in line and "best.pt (epoch 1)" in line, line
    assert (run_dir / "best.pt").read_bytes() == best_bytes, "best.pt was replaced by a diverged model"
    assert load_checkpoint(run_dir / "last.pt")["end_reason"] == "diverged"
    out = tmp_path / "pred"
    code, stdout, stderr = in_process(predict.main, predict.get_args, [
        "--checkpoint", str(run_dir / "best.pt"), "--data-root", str(root), "--split", "test", "--out", str(out),
        "--device", "cpu", "--no-figures"], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["per_class_dice"]["body"] is not None


# ----------------------------------------------------------------------------- resume, review rule

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    root = write_dataset(base / "data", patients=(4, 5, 6, 7, 8), weeks=(0, 1, 2))
    run_dir = base / "run"
    result = run("train.py", "--data-root", str(root), "--out", str(run_dir), "--epochs", "3", "--patience", "1",
                 "--deterministic", *TINY)
    assert result.returncode == 0, explain(result)
    return {"root": root, "run": run_dir, "result": result}


def test_training_logs_its_steps_and_the_grid_of_each_figure(finished_run):
    result = finished_run["result"]
    assert "final validation: 1 of 3" in result.stderr, explain(result)
    assert "per epoch on the preprocessed grid" in result.stdout
    assert "Final validation of best.pt on 3 volume(s), each on its source grid" in result.stdout
    header = (finished_run["run"] / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_seconds", "val_seconds", "skipped_steps"} <= set(header)


def test_resuming_a_finished_run_trains_nothing_and_keeps_best_pt(finished_run, capsys):
    run_dir = finished_run["run"]
    last = load_checkpoint(run_dir / "last.pt")
    with open(run_dir / "metrics.csv", newline="") as handle:
        scores = [float(row["mean_fg_dice"]) for row in csv.DictReader(handle)]
    # with --patience 1: stopped early exactly when the last epoch did not improve on the best
    best_epoch = 1 + int(np.argmax(scores))
    assert last["end_reason"] == ("early_stop" if len(scores) > best_epoch else "completed")
    best_bytes, metrics = (run_dir / "best.pt").read_bytes(), (run_dir / "metrics.csv").read_text()
    code, stdout, stderr = in_process(train.main, train.get_args, ["--out", str(run_dir), "--resume"], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "Nothing to train" in stdout, stdout[-3000:] + stderr[-3000:]
    assert (run_dir / "best.pt").read_bytes() == best_bytes
    assert (run_dir / "metrics.csv").read_text() == metrics


def flags_from_fit(rule: dict, class_names: list[str]) -> set[tuple[str, str]]:
    """The organs the stored rule flags on the stored validation records, worked out here."""
    flagged = set()
    for volume in rule["volumes"]:
        for c, name in enumerate(class_names[1:], start=1):
            organ, score = rule["organs"][name], volume["uncertainty"][c]
            if score is None:
                if organ["expected"]:
                    flagged.add((volume["case"], name))
            elif organ["threshold"] is not None and score > organ["threshold"]:
                flagged.add((volume["case"], name))
    return flagged


def test_predict_on_the_validation_patients_flags_what_training_fitted(finished_run, tmp_path, capsys):
    run_dir, root = finished_run["run"], finished_run["root"]
    rule = json.loads((run_dir / "uncertainty.json").read_text())
    decision = json.loads((run_dir / "postprocessing.json").read_text())
    assert rule["settings"] == {"tta": False, "overlap": 0.5, "largest_component": sorted(decision["largest_component"]),
                                "score": "expected_dice_deficit"}
    class_names = ["background", "body", "bone", "bladder", "rectum", "prostate"]
    expected = flags_from_fit(rule, class_names)
    code, stdout, stderr = in_process(predict.main, predict.get_args, [
        "--checkpoint", str(run_dir), "--data-root", str(root), "--split", "val", "--out", str(tmp_path / "val"),
        "--device", "cpu", "--no-figures"], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "refitted" not in stdout
    summary = json.loads((tmp_path / "val" / "summary.json").read_text())
    assert {(f["case"], f["organ"]) for f in summary["flagged"]} == expected
    assert summary["review_rule"]["settings"] == rule["settings"]
    # the stored volumes name their patient, for the held-out flag rate (each validation patient against the
    # rule fitted on the others); this run has one validation patient, so there is none, and the log says so
    split = json.loads((run_dir / "splits.json").read_text())
    assert split["val"] == ["004"] and {v["patient"] for v in rule["volumes"]} == {"004"}
    assert rule["held_out"] is None and summary["review_rule"]["held_out"] is None
    assert "Review rule: fewer than two validation patients, so no held-out flag rate." in stdout

    code, stdout, stderr = in_process(predict.main, predict.get_args, [
        "--checkpoint", str(run_dir), "--data-root", str(root), "--split", "val", "--out", str(tmp_path / "val_tta"),
        "--device", "cpu", "--no-figures", "--tta"], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "so it is refitted on the members' validation volumes" in stdout, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((tmp_path / "val_tta" / "summary.json").read_text())
    assert summary["review_rule"]["settings"]["tta"] is True


def test_predict_overlap_reaches_the_windows_and_refits_the_review_rule(finished_run, tmp_path, monkeypatch, capsys):
    """predict.py --overlap 0.25 (training fitted its rule at 0.5): every sliding window of the run,
    the validation volumes revalidated for the refit included, uses 0.25 (recorded by wrapping
    MONAI's sliding_window_inference where inference.py calls it), and the rule is refitted under it."""
    from pelvicseg import inference
    overlaps = []
    original = inference.sliding_window_inference

    def recording(*args, **kwargs):
        overlaps.append(kwargs["overlap"])
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_inference", recording)
    out = tmp_path / "val_overlap"
    code, stdout, stderr = in_process(predict.main, predict.get_args, [
        "--checkpoint", str(finished_run["run"]), "--data-root", str(finished_run["root"]), "--split", "val",
        "--out", str(out), "--device", "cpu", "--no-figures", "--no-hd95", "--overlap", "0.25"], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "overlap 0.5, largest component" in stdout and "so it is refitted on the members' validation volumes" \
        in stdout, stdout[-3000:]
    assert "overlap 0.25, tta False" in stdout  # the banner
    validation_volumes = len(json.loads((finished_run["run"] / "uncertainty.json").read_text())["volumes"])
    assert overlaps == [0.25] * (2 * validation_volumes)  # refit on the validation volumes, then those cases
    summary = json.loads((out / "summary.json").read_text())
    assert summary["review_rule"]["settings"]["overlap"] == 0.25
    assert json.loads((out / "predict_config.json").read_text())["overlap"] == 0.25


# ----------------------------------------------------------------------------- a user's first hour

def lcc_figures(dice, dice_lcc):
    """A validation record for one organ (index 1): Dice without and with its largest-component step."""
    return {"dice": [None, dice], "dice_lcc": [None, dice_lcc], "hd95": [None, 5.0], "hd95_lcc": [None, 5.0]}


def test_post_processing_is_kept_unless_it_lowers_validation_dice():
    from pelvicseg.inference import decide_postprocessing, keep_largest_component

    # validation without islands: the step changes nothing and is kept
    organ = ["background", "organ"]
    assert decide_postprocessing([lcc_figures(0.9, 0.9), lcc_figures(0.8, 0.8)], organ)["largest_component"] == ["organ"]
    # an organ truly in two parts: the step removes one and lowers Dice, so it is dropped
    target = np.zeros((20, 20, 20), dtype=np.uint8)
    target[2:8, 2:8, 2:8] = 1
    target[12:16, 12:16, 12:16] = 1
    from pelvicseg.metrics import dice_per_class
    dice, dice_lcc = (float(dice_per_class(p, target, 2)[1]) for p in (target, keep_largest_component(target, [1])))
    assert dice == 1.0 and dice_lcc < 1.0
    assert decide_postprocessing([lcc_figures(dice, dice_lcc)], organ)["largest_component"] == []
    # and a test volume with an island then loses it
    with_island = target.copy()
    with_island[12:16, 12:16, 12:16] = 0
    with_island[17:19, 1:3, 1:3] = 1
    assert keep_largest_component(with_island, [1])[17:19, 1:3, 1:3].sum() == 0


def test_a_label_map_given_as_the_image_is_refused_in_one_line(tmp_path):
    _, label = synthetic_case((24, 20, 16))
    path = write_nifti(tmp_path / "scan.nii.gz", label.astype(np.float32))
    with pytest.raises(DataError) as error:
        LoadValidated(("image", "label"))({"image": str(path)})
    message = str(error.value)
    assert message.startswith(str(path)) and "looks like a label map" in message and "\n" not in message
    # an integer-valued MR image (int16 storage) is not one
    image = (label * 100 + np.random.default_rng(0).integers(0, 40, label.shape)).astype(np.int16)
    LoadValidated(("image",))({"image": str(write_nifti(tmp_path / "int16.nii.gz", image))})


def test_a_bad_case_among_good_ones_writes_nothing_and_names_the_case(finished_run, tmp_path):
    scans = tmp_path / "scans"
    for name in ("a", "b", "c"):
        image, _ = synthetic_case((24, 20, 16), seed=len(name) + ord(name))
        write_nifti(scans / f"{name}.nii.gz", image)
    _, label = synthetic_case((24, 20, 16))
    bad = write_nifti(scans / "c.nii.gz", label.astype(np.float32))
    out = tmp_path / "out"
    result = run("predict.py", "--checkpoint", str(finished_run["run"]), "--input", str(scans), "--out", str(out),
                 "--device", "cpu")
    assert result.returncode == 2, explain(result)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {bad}:") and "label map" in line, explain(result)
    assert not out.exists() or not any(out.iterdir()), f"written before the error: {list(out.iterdir())}"


def test_a_data_root_above_two_datasets_is_named_as_such(tmp_path):
    write_dataset(tmp_path / "data" / "phantom", patients=(4, 5, 6), weeks=(0,))
    write_dataset(tmp_path / "data" / "phantom_other", patients=(4, 5, 6), weeks=(0,))
    with pytest.raises(DataError) as error:
        find_cases(tmp_path / "data")
    message = str(error.value)
    assert "more than one HipMRI dataset" in message and "\n" not in message
    assert str(tmp_path / "data" / "phantom") in message and str(tmp_path / "data" / "phantom_other") in message


@pytest.mark.parametrize("script,default", [("train.py", "(default: 0.25)"), ("predict.py", "(default: 0.5)")])
def test_help_lists_the_defaults(script, default, monkeypatch, capsys):
    """--help through the script's own parser, as ``python SCRIPT --help`` runs it (argparse prints
    the help and exits 0), 200 columns wide."""
    monkeypatch.setenv("COLUMNS", "200")
    get_args = {"train.py": train.get_args, "predict.py": predict.get_args}[script]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        get_args(["--help"])
    assert exited.value.code == 0
    stdout = capsys.readouterr().out
    options = stdout[stdout.index("options:"):]  # past the usage line, which names flags too
    overlap_help = options[options.index("\n  --overlap"):].split("\n  --")[1]
    assert default in " ".join(overlap_help.split()), overlap_help


def test_flag_precision_and_recall_are_counted_against_the_organ_median_by_hand():
    import predict

    names = ["background", "body", "bone"]
    # body Dice 0.9 0.8 0.7 0.6 (median 0.75): below in cases 2, 3; bone 0.5 0.6 0.7 0.8: below in 0, 1
    dice = [[np.nan, 0.9, 0.5], [np.nan, 0.8, 0.6], [np.nan, 0.7, 0.7], [np.nan, 0.6, 0.8]]
    flags = [[], [{"organ": "bone"}], [{"organ": "body"}], [{"organ": "bone"}]]
    records = [{"voxel_auroc": 0.9, "scores": [np.nan, 0.1 * i, 0.2], "dice": np.array(d), "flags": f}
               for i, (d, f) in enumerate(zip(dice, flags))]
    evaluation = predict.evaluate_uncertainty(records, names)
    # flagged: bone@1 (below), body@2 (below), bone@3 (not): precision 2/3; 4 below, 2 flagged: recall 1/2
    assert evaluation["flag_precision"] == pytest.approx(2 / 3)
    assert evaluation["flag_recall"] == pytest.approx(0.5)
    assert "flag_precision_vs_validation" not in evaluation  # no rule, so no validation medians
    # against the validation medians the rule stores: body 0.85 (below: cases 1, 2, 3), bone 0.55 (below: case 0)
    rule = {"organs": {"body": {"dice_median": 0.85}, "bone": {"dice_median": 0.55}}}
    evaluation = predict.evaluate_uncertainty(records, names, rule)
    # flagged: bone@1 (0.6, not below), body@2 (below), bone@3 (not): precision 1/3; 4 below, 1 flagged: 1/4
    assert evaluation["organs_below_validation_median_dice"] == 4
    assert evaluation["flag_precision_vs_validation"] == pytest.approx(1 / 3)
    assert evaluation["flag_recall_vs_validation"] == pytest.approx(0.25)
    assert evaluation["flag_precision"] == pytest.approx(2 / 3)  # the test-median figures are unchanged
