"""The training recipe's flags in real runs on tiny data: --steps-per-epoch (an epoch is exactly N
optimiser steps, counted by Adam's own step counter, whatever the number of training volumes),
--val-every (validation on exactly the epochs the cadence names, the final validation of best.pt
still run), the per-step schedule (--warmup-steps, closed form of the global step, so a resumed
run continues exactly), metrics.csv's elapsed_seconds surviving --resume, and two identical
float32 runs writing identical rows but for their clocks.

Expected values are computed here, independently of train.py: the schedule by hand from its
definition, step counts from the flags. Nothing of the project is mocked.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from conftest import write_dataset  # noqa: E402
from pelvicseg import training  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from pelvicseg.figures import save_training_curves  # noqa: E402

FP32 = ["--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu",
        "--no-amp"]
CLOCK_COLUMNS = {"seconds", "train_seconds", "val_seconds", "elapsed_seconds"}
VALIDATION_COLUMNS = ("val_loss", "dice_body", "mean_fg_dice", "val_seconds")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one CPU thread for tiny networks


@pytest.fixture(scope="module")
def one_volume_root(tmp_path_factory) -> Path:
    """3 patients x 1 week: the 6:2:2 split leaves exactly one training volume."""
    return write_dataset(tmp_path_factory.mktemp("one_volume"), patients=(4, 5, 6), weeks=(0,))


def trained(capsys, data_root, out, *flags) -> str:
    capsys.readouterr()
    code = run_cli(train.main, train.get_args(["--data-root", str(data_root), "--out", str(out), *map(str, flags)]))
    captured = capsys.readouterr()
    assert code == 0, f"exit {code}\n{captured.out[-3000:]}\n{captured.err[-3000:]}"
    return captured.out


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def adam_steps(run_dir: Path) -> set[int]:
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


def training_volumes(run_dir: Path) -> int:
    import json

    split = json.loads((run_dir / "splits.json").read_text())
    return len(split["train"])


@pytest.mark.parametrize("root_name, steps", [("one_volume_root", 5), ("training_root", 2)])
def test_an_epoch_is_exactly_steps_per_epoch_optimiser_steps(root_name, steps, request, tmp_path, capsys):
    """One training volume and 5 steps (the volume gives several crops an epoch); six training
    volumes and 2 steps (fewer steps than volumes). Adam counts its own steps."""
    root = request.getfixturevalue(root_name)
    run_dir = tmp_path / "run"
    trained(capsys, root, run_dir, *FP32, "--epochs", 2, "--steps-per-epoch", steps)
    patients = training_volumes(run_dir)
    assert (patients == 1) if root_name == "one_volume_root" else (patients == 3)  # 3 patients x 2 weeks
    assert adam_steps(run_dir) == {2 * steps}


def test_epoch_sampler_draws_every_volume_equally_often_and_is_seeded():
    drawn = list(training.EpochSampler(4, 10, seed=3))
    assert len(drawn) == 10 and sorted(set(drawn)) == [0, 1, 2, 3]
    counts = [drawn.count(v) for v in range(4)]
    assert max(counts) - min(counts) <= 1
    assert drawn == list(training.EpochSampler(4, 10, seed=3))
    assert drawn != list(training.EpochSampler(4, 10, seed=4))


def test_learning_rate_warms_up_then_decays_to_a_hundredth_at_the_last_step():
    base, warmup, total = 1e-2, 4, 14
    minimum = base / 100
    expected = [minimum + (base - minimum) * s / warmup for s in range(warmup)]
    expected += [minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - 1 - warmup)))
                 for s in range(warmup, total)]
    got = [training.learning_rate(s, total, base, warmup) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[warmup] == pytest.approx(base) and got[-1] == pytest.approx(minimum)


def test_poly_decay_is_nnunets_to_the_run_end_after_the_warm_up():
    base, warmup, total = 1e-2, 3, 13
    minimum = base / 100
    expected = [minimum + (base - minimum) * s / warmup for s in range(warmup)]
    expected += [base * (1 - (s - warmup) / (total - warmup)) ** 0.9 for s in range(warmup, total)]
    got = [training.learning_rate(s, total, base, warmup, "poly") for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[warmup] == pytest.approx(base) and got[-1] == pytest.approx(base * 0.1**0.9)  # 1 step of 10 left


def test_optimizer_sgd_trains_with_nesterov_momentum_and_the_poly_rate(training_root, tmp_path, capsys):
    run_dir = tmp_path / "sgd"
    trained(capsys, training_root, run_dir, *FP32, "--optimizer", "sgd", "--lr", 1e-2, "--epochs", 2,
            "--steps-per-epoch", 3, "--val-every", 2)
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.99 and group["nesterov"] is True
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    # the rate of each epoch's last step (2 and 5 of 6), nnU-Net's poly without warm-up
    rates = [float(r["lr"]) for r in metrics_rows(run_dir)]
    assert rates == pytest.approx([1e-2 * (1 - 2 / 6) ** 0.9, 1e-2 * (1 - 5 / 6) ** 0.9], rel=1e-5)
    assert state["config"]["optimizer"] == "sgd"


def test_cpu_defaults_train_without_loader_workers_and_record_it(training_root, tmp_path, capsys):
    """On a CPU the device defaults fill --workers 0 (and one pass an epoch, no warm-up); the values
    used are in config.json, so --resume elsewhere continues the same run."""
    import json

    run_dir = tmp_path / "defaults"
    flags = [f for f in FP32 if f not in ("--workers", "0")]
    assert "--workers" not in flags and "--device" in flags
    trained(capsys, training_root, run_dir, *flags, "--epochs", 1)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["workers"], config["steps_per_epoch"], config["warmup_steps"]) == (0, 0, 0)
    assert train.DEVICE_DEFAULTS["cuda"]["workers"] >= 1


def test_validation_runs_on_the_cadence_and_after_the_last_epoch(training_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    stdout = trained(capsys, training_root, run_dir, *FP32, "--epochs", 5, "--steps-per-epoch", 1,
                     "--val-every", 2)
    rows = metrics_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    validated = [int(r["epoch"]) for r in rows if r["val_loss"] != ""]
    assert validated == [2, 4, 5]
    for row in rows:
        filled = [row[c] != "" for c in VALIDATION_COLUMNS]
        assert all(filled) if int(row["epoch"]) in validated else not any(filled), row
        assert row["train_loss"] != "" and row["elapsed_seconds"] != ""
    best_epoch = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["epoch"]
    assert best_epoch in validated
    assert "Final validation of best.pt" in stdout and (run_dir / "postprocessing.json").is_file()
    assert (run_dir / "training_curves.png").is_file()


def test_patience_counts_epochs_since_the_best_validation(training_root, tmp_path, capsys):
    """With validations at epochs 2, 4, 6, ... and patience 1, the run stops at the first validation
    that is not better than the last one: at an even epoch, never at an odd one."""
    run_dir = tmp_path / "run"
    trained(capsys, training_root, run_dir, *FP32, "--epochs", 12, "--steps-per-epoch", 1, "--val-every", 2,
            "--patience", 1, "--lr", 0)
    rows = metrics_rows(run_dir)
    # lr 0: the weights never change, so the second validation (epoch 4) is not better: stop there.
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["end_reason"] == "early_stop" and state["epochs_without_improvement"] == 2


def interrupt_after_first_row(metrics_csv: Path, timeout_s: float = 120.0) -> None:
    """SIGINT to this process as soon as metrics.csv holds a row: while train.py still writes
    last.pt and the curves of that epoch, well before the next epoch's first step ends."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if metrics_csv.is_file() and len(metrics_csv.read_text().splitlines()) >= 2:
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.005)


def without_clocks(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in CLOCK_COLUMNS}


def test_resume_after_the_first_epoch_equals_the_uninterrupted_run(training_root, tmp_path, capsys):
    flags = [*FP32, "--steps-per-epoch", 4, "--warmup-steps", 2, "--lr", 1e-2, "--epochs", 2]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    trained(capsys, training_root, whole, *flags)
    # The first command is stopped as a user stops it, by Ctrl-C, once epoch 1's row is written: it
    # finishes the step it is in (epoch 2's first) and keeps last.pt of epoch 1.
    watcher = threading.Thread(target=interrupt_after_first_row, args=(resumed / "metrics.csv",), daemon=True)
    watcher.start()
    trained(capsys, training_root, resumed, *flags)
    watcher.join(timeout=60)
    assert [int(r["epoch"]) for r in metrics_rows(resumed)] == [1]
    first_elapsed = float(metrics_rows(resumed)[0]["elapsed_seconds"])
    trained(capsys, training_root, resumed, "--resume")
    rows_whole, rows_resumed = metrics_rows(whole), metrics_rows(resumed)
    assert [without_clocks(r) for r in rows_resumed] == [without_clocks(r) for r in rows_whole]
    minimum = 1e-2 / 100
    expected_first = minimum + (1e-2 - minimum) * 0.5 * (1 + math.cos(math.pi * (3 - 2) / (8 - 1 - 2)))
    assert float(rows_resumed[0]["lr"]) == pytest.approx(expected_first, rel=1e-5)
    assert float(rows_resumed[1]["lr"]) == pytest.approx(minimum, rel=1e-5)
    # the clock goes on from the first command: epoch 2's elapsed time includes epoch 1's and its own
    assert float(rows_resumed[0]["elapsed_seconds"]) == first_elapsed
    assert float(rows_resumed[1]["elapsed_seconds"]) >= first_elapsed + float(rows_resumed[1]["seconds"])
    assert adam_steps(resumed) == adam_steps(whole) == {8}


def test_two_identical_float32_runs_write_identical_rows_but_for_their_clocks(training_root, tmp_path, capsys):
    flags = [*FP32, "--epochs", 2, "--steps-per-epoch", 3, "--warmup-steps", 1, "--val-every", 2]
    trained(capsys, training_root, tmp_path / "a", *flags)
    trained(capsys, training_root, tmp_path / "b", *flags)
    rows_a, rows_b = metrics_rows(tmp_path / "a"), metrics_rows(tmp_path / "b")
    assert len(rows_a) == 2 and [without_clocks(r) for r in rows_a] == [without_clocks(r) for r in rows_b]


def test_training_curves_show_validation_dice_against_wall_time(tmp_path):
    """Three panels (the third against elapsed_seconds) when metrics.csv has the clock; two for an
    older metrics.csv without it. Rows without validation are skipped, not drawn as zeros."""
    import matplotlib.image

    names = ["background", "body"]
    header = ["epoch", "train_loss", "val_loss", "dice_background", "dice_body", "elapsed_seconds",
              "train_dice_background", "train_dice_body"]
    rows = [[1, 1.0, "", "", "", 10.0, 0.5, 0.5], [2, 0.9, 0.8, 0.9, 0.8, 20.0, 0.6, 0.6]]
    for name, columns in (("new", header), ("old", header[:5] + header[6:])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(row if name == "new" else row[:5] + row[6:])
        save_training_curves(tmp_path / f"{name}.csv", names, tmp_path / f"{name}.png")
    width_new = matplotlib.image.imread(tmp_path / "new.png").shape[1]
    width_old = matplotlib.image.imread(tmp_path / "old.png").shape[1]
    assert width_new == 1800 and width_old == 1200


# ----------------------------------------------------------------------------- the benchmarks time training's step

def tiny_network():
    from modules import ImprovedUNet3D

    torch.manual_seed(0)
    return ImprovedUNet3D(in_channels=1, out_channels=6, channels=[4, 8, 8, 8])


def test_bench_times_trainings_step_with_its_non_finite_guard():
    """bench.py's step is Trainer.step: a batch with a NaN voxel is skipped (weights unchanged, loss
    NaN), where a copy of the step without the guard would write NaN into every weight."""
    from tools import bench

    model = tiny_network()
    trainer = bench.make_trainer(model, None)
    assert isinstance(trainer, training.Trainer)
    image, label = torch.rand(1, 1, 16, 16, 16), torch.randint(0, 6, (1, 1, 16, 16, 16)).float()
    before = [p.detach().clone() for p in model.parameters()]
    image[0, 0, 0, 0, 0] = float("nan")
    assert math.isnan(bench.train_step(trainer, image, label))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    image[0, 0, 0, 0, 0] = 0.5
    assert math.isfinite(bench.train_step(trainer, image, label))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gpu_check_compares_trainings_step_with_its_gradient_clipping():
    """gpu_check's step is Trainer.step: a loss scaled by 1e6 leaves gradients clipped to training's
    norm (12), which a copy of the step without clipping would leave a million times larger."""
    from monai.losses import DiceCELoss

    from tools import gpu_check

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    image, label = torch.rand(1, 1, 16, 16, 16), torch.randint(0, 6, (1, 1, 16, 16, 16)).float()
    output = gpu_check.training_step(tiny_network(), image, label, lambda x, y: 1e6 * dice_ce(x, y), None, False)
    norm = torch.cat([g.reshape(-1) for g in output.gradients.values()]).norm()
    assert float(norm) == pytest.approx(training.GRADIENT_CLIP_NORM, rel=1e-4)


def test_one_native_bf16_answer_everywhere():
    """bench.py's bf16 configuration and gpu_check's report follow inference's answer (the CPU's
    flags), not oneDNN's, which says yes on CPUs that only emulate bf16."""
    from pelvicseg import inference
    from tools import bench, gpu_check

    native = inference.cpu_has_native_bf16()
    assert gpu_check.cpu_bf16_native() is native
    names = [c.name for c in bench.configurations(torch.device("cpu"), compile_on_cpu=False)]
    assert ("ours_bf16" in names) is native


def test_class_weighting_and_crop_ratios_reach_the_run(training_root, tmp_path, capsys):
    """Both flags on the command line: the banner says where the weights go, config.json keeps
    both (so --resume and adapt.py read them back), and a wrong number of ratios is one line."""
    out = trained(capsys, training_root, tmp_path / "run", *FP32, "--patch-size", "8", "8", "8", "--epochs", "1",
                  "--steps-per-epoch", "1", "--class-weighting", "none", "--crop-ratios", "0", "0", "0", "0", "0", "1")
    assert "Class weights (training voxel counts to the power -0.25; not used)" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["class_weighting"] == "none" and config["crop_ratios"] == [0, 0, 0, 0, 0, 1]
    capsys.readouterr()
    code = run_cli(train.main, train.get_args(["--data-root", str(training_root), "--out", str(tmp_path / "bad"),
                                               *FP32, "--patch-size", "8", "8", "8", "--crop-ratios", "1", "1"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --crop-ratios: 2 value(s) for 6 classes"], err


def test_class_weight_power_reaches_the_weights_and_an_older_run_resumes_with_its_own(training_root, tmp_path,
                                                                                        capsys):
    """Weights are frequency^-p normalised to mean 1, so a run at power 0.5 holds, class against
    class, the squares of the ratios a run at 0.25 holds (same training labels, counts unknown to
    the test). A last.pt written before the flag existed (no class_weight_power in its settings)
    resumes with the inverse square-root weights it was trained with, not with the new default."""
    flags = [*FP32, "--epochs", "1", "--steps-per-epoch", "1"]
    trained(capsys, training_root, tmp_path / "quarter", *flags)
    trained(capsys, training_root, tmp_path / "half", *flags, "--class-weight-power", "0.5")
    quarter = np.array(load_checkpoint(tmp_path / "quarter" / "best.pt")["class_weights"])
    half = np.array(load_checkpoint(tmp_path / "half" / "best.pt")["class_weights"])
    assert json.loads((tmp_path / "quarter" / "config.json").read_text())["class_weight_power"] == 0.25
    np.testing.assert_allclose(half / half[0], (quarter / quarter[0]) ** 2, rtol=1e-4)
    assert half.max() / half.min() > 2.0  # the phantom's classes are far from equally common

    last = tmp_path / "half" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    del state["config"]["class_weight_power"]
    torch.save(state, last)
    trained(capsys, training_root, tmp_path / "half", "--resume", "--epochs", "2")
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 2 and resumed["config"]["class_weight_power"] == 0.5
    np.testing.assert_allclose(np.array(resumed["class_weights"]), half, rtol=1e-6)

    capsys.readouterr()
    code = run_cli(train.main, train.get_args(["--data-root", str(training_root), "--out", str(tmp_path / "bad"),
                                               *flags, "--class-weight-power", "-0.5"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--class-weight-power -0.5 would weigh the common classes" in err[0], err
    assert not (tmp_path / "bad" / "config.json").exists()


def test_class_weighting_puts_the_weights_where_it_says():
    """The loss by hand: cross-entropy with or without per-class weights (a weighted mean over
    voxels), plus the mean over classes of 1 - soft Dice (MONAI's smoothing of 1e-5)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, 2)
    labels = torch.randint(0, 3, (1, 1, 4, 4, 2))
    weights = torch.tensor([0.2, 1.0, 3.0])

    def cross_entropy(w):
        log_p = torch.log_softmax(logits, 1)
        picked = log_p.gather(1, labels).squeeze(1)
        voxel_w = torch.ones_like(picked) if w is None else w[labels.squeeze(1)]
        return float(-(voxel_w * picked).sum() / voxel_w.sum())

    def dice(w):
        p = torch.softmax(logits, 1)
        onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float()
        inter, total = (p * onehot).sum((0, 2, 3, 4)), (p + onehot).sum((0, 2, 3, 4))
        per_class = 1 - (2 * inter + 1e-5) / (total + 1e-5)
        return float(per_class.mean() if w is None else (per_class * w).sum() / w.sum() * 1.0)

    expected = {"none": cross_entropy(None) + dice(None), "ce": cross_entropy(weights) + dice(None)}
    for weighting, value in expected.items():
        loss = training.make_loss("combined", weights, weighting)
        assert float(loss(logits, labels)) == pytest.approx(value, rel=1e-5), weighting
    both = float(training.make_loss("combined", weights, "ce-dice")(logits, labels))
    assert both != pytest.approx(expected["ce"], rel=1e-3)  # the Dice term is weighted too


def test_crop_ratios_centre_every_crop_on_the_classes_they_name():
    """A volume whose prostate (class 5) is one 2x2x2 block in a corner: with ratios naming only
    the prostate every 4^3 crop holds prostate; with the default ratios some crops do not."""
    from dataset import augmentation

    label = torch.zeros(1, 16, 16, 16)
    label[0, 1:3, 1:3, 1:3] = 5
    label[0, 8:, :, :] = 1
    item = {"image": torch.rand(1, 16, 16, 16), "label": label}

    def prostate_share(ratios):
        crops = augmentation((4, 4, 4), 6, ratios, spatial_on_device=True).set_random_state(seed=0)
        return sum(bool((crops(dict(item))[0]["label"] == 5).any()) for _ in range(20)) / 20

    assert prostate_share([0, 0, 0, 0, 0, 1]) == 1.0
    assert prostate_share([1, 1, 0, 0, 0, 0]) < 0.5
