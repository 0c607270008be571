"""Flags that no other test passed: --debug of every script (cli.py's traceback path), the values
--volume-change refuses, train.py's --overlap, --phantom-patients and --phantom-weeks, and
tools.bench's --roi, --overlap, --threads, --seed, --augment and --compile. Each
is passed on a real command line and its effect checked. predict.py's --overlap and --roi-names
are in test_engine.py and test_dicom_study.py, export.py's flags in test_export.py; the rule
that every flag is passed somewhere is tests/test_flag_coverage.py.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import adapt  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from dataset import DataError  # noqa: E402
from pelvicseg import phantom  # noqa: E402
from pelvicseg.checkpoint import CheckpointError  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from pelvicseg.inference import PREDICTION_OVERLAP  # noqa: E402

TINY = ["--epochs", "1", "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0",
        "--device", "cpu"]


def bad_inputs(tmp_path: Path) -> dict:
    """Per script: (module, a command line that fails on its input, the error it raises)."""
    missing = str(tmp_path / "missing")
    return {
        "train": (train, ["--data-root", missing, "--out", str(tmp_path / "run"), *TINY], DataError),
        "predict": (predict, ["--checkpoint", missing + ".pt", "--input", missing, "--out", str(tmp_path / "p")],
                    CheckpointError),
        "adapt": (adapt, ["--checkpoint", missing + ".pt", "--patient", "004", "--out", str(tmp_path / "a")],
                  CheckpointError),
        "export": (export, ["--checkpoint", missing + ".pt", "--out", str(tmp_path / "bundle")], CheckpointError),
    }


@pytest.mark.parametrize("script", ["train", "predict", "adapt", "export"])
def test_debug_raises_the_error_that_is_otherwise_one_line(script, tmp_path, capsys):
    module, argv, error = bad_inputs(tmp_path)[script]
    assert run_cli(module.main, module.get_args(argv)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], lines
    with pytest.raises(error, match="missing"):
        run_cli(module.main, module.get_args([*argv, "--debug"]))


def test_debug_on_the_command_line_prints_the_traceback(tmp_path):
    """As a user sees it: without --debug one line and exit 2, with it Python's traceback."""
    argv = ["predict.py", "--checkpoint", str(tmp_path / "missing.pt"), "--input", str(tmp_path), "--out",
            str(tmp_path / "out")]
    plain = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    debug = subprocess.run([sys.executable, *argv, "--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert "CheckpointError" in debug.stderr and "missing.pt" in debug.stderr


@pytest.mark.parametrize("value, message", [("-0.1", "-0.1: must be a fraction of the first week's volume, 0 or more"),
                                            ("nan", "nan: must be a fraction"), ("inf", "inf: must be a fraction"),
                                            ("lots", "'lots' is not a number")])
def test_volume_change_refuses_negative_nonfinite_and_text(value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        predict.get_args(["--checkpoint", "run", "--input", "scans", "--out", str(tmp_path), "--volume-change", value])
    assert stopped.value.code == 2
    assert f"argument --volume-change: {message}" in capsys.readouterr().err
    assert predict.get_args(["--checkpoint", "run", "--input", "scans", "--out", str(tmp_path),
                             "--volume-change", "0"]).volume_change == 0.0  # 0 is allowed: every change flagged


def test_default_phantom_is_generated_as_the_phantom_flags_say_and_validation_uses_overlap(tmp_path, monkeypatch,
                                                                                           capsys):
    """train.py without --data-root: the phantom in ./data/phantom/ has --phantom-patients x
    --phantom-weeks cases (generated small here: the phantom's own generator at another shape), and
    the per-epoch validation's sliding windows use --overlap (recorded by wrapping train.py's own
    predict_probabilities, which still runs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(phantom, "write_phantom", functools.partial(phantom.write_phantom, shape=(20, 18, 12)))
    overlaps = []
    original = train.predict_probabilities

    def recording(*args, **kwargs):
        overlaps.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "predict_probabilities", recording)
    argv = ["--out", "run", "--phantom-patients", "5", "--phantom-weeks", "2", "--overlap", "0.75", *TINY]
    assert run_cli(train.main, train.get_args(argv)) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "Generating the default phantom (5 patients x 2 weeks)" in printed
    images = sorted(os.listdir(tmp_path / "data" / "phantom" / "semantic_MRs_anon"))
    assert len(images) == 10 and images[0] == "Case_004_Week0_LFOV.nii.gz" and images[-1].startswith("Case_008_Week1")
    assert json.loads((tmp_path / "data" / "phantom" / "phantom.json").read_text()) == {
        "patients": 5, "weeks": 2, "seed": 0}
    # one epoch over the validation patient's two weeks at --overlap; best.pt's final validation on the
    # source grid at predict.py's overlap, so the review rule fitted there applies to predict.py as it is
    assert overlaps == [0.75, 0.75, PREDICTION_OVERLAP, PREDICTION_OVERLAP]
    assert "per epoch on the preprocessed grid (overlap 0.75)" in printed
    assert json.loads((tmp_path / "run" / "config.json").read_text())["overlap"] == 0.75


def test_bench_window_overlap_threads_seed_and_augment_reach_the_measurements(tmp_path, monkeypatch):
    """tools.bench with --roi 16 16 16 --overlap 0.25 --threads 1 --seed 3 --augment loader: the
    inferences run in 16^3 windows at 0.25 (recorded by wrapping bench's predict_probabilities),
    torch runs on one thread, the loader is measured with MONAI's per-sample augmentation, and the
    report records them. --compile only adds the compiled configuration (measuring it takes
    minutes on a small CPU, so it is checked where the configurations are chosen)."""
    import torch
    from tools import bench

    calls = []
    original = bench.predict_probabilities

    def recording(model, image, roi, overlap, *args, **kwargs):
        calls.append((list(roi), overlap))
        return original(model, image, roi, overlap, *args, **kwargs)

    monkeypatch.setattr(bench, "predict_probabilities", recording)
    threads = torch.get_num_threads()
    try:
        report = bench.main(bench.get_args([
            "--device", "cpu", "--size", "32", "32", "16", "--roi", "16", "16", "16", "--overlap", "0.25",
            "--threads", "1", "--seed", "3", "--augment", "loader", "--warmup", "2", "--repeats", "1", "--cases", "2",
            "--workers", "0", "--channels", "4", "8", "8", "8", "--out", str(tmp_path / "bench.json")]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert calls and {(tuple(roi), overlap) for roi, overlap in calls} == {((16, 16, 16), 0.25)}
    assert report["roi"] == [16, 16, 16] and report["overlap"] == 0.25
    assert report["settings"]["seed"] == 3 and report["settings"]["threads"] == 1
    assert report["loader"]["augment"] == "loader" and "error" not in report["loader"]
    assert not bench.get_args(["--device", "cpu"]).compile and bench.get_args(["--device", "cpu", "--compile"]).compile
    names = [c.name for c in bench.configurations(torch.device("cpu"), compile_on_cpu=True)]
    assert "ours_compiled" in names and "ours_compiled" not in [
        c.name for c in bench.configurations(torch.device("cpu"), compile_on_cpu=False)]
