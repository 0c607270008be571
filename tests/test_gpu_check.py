"""gpu_check.py: its --dry-run end to end on the CPU (so the GPU check never rots between GPU
spells), the time budget, and the pieces that decide pass or fail."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project is a set of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from tools import gpu_check  # noqa: E402

TABLE_HEADER = "| step | check | measured | target | result |"


def numbers_in(value, path=""):
    """(path, number) for every number in nested figures (booleans are not figures)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers_in(item, f"{path}[{index}]")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # About 2 minutes on 2 cores: tiny phantom, tiny networks, one timed bench step, two gloo ranks.
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    finished = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.is_file() else None
    return finished, report


def test_dry_run_runs_every_step(dry_run):
    finished, report = dry_run
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    assert report is not None and report["dry_run"] is True and report["device"] == "cpu"
    assert list(report["steps"]) == list(gpu_check.STEPS)
    for name, step in report["steps"].items():
        expected = {"skipped"} if name == "out_of_memory" else {"ran", "passed"}
        assert step["status"] in expected, f"{name}: {step['status']} {step['error']} {step['notes']}"
        assert step["error"] is None, name
        assert not [c for c in step["checks"] if c["passed"] is False], (name, step["checks"])
        for command in step["commands"]:
            assert command["returncode"] == 0 and command["stopped"] is None, (name, command)
    # Every step that runs something checked what it ran.
    for name in ("fast_path", "benchmark", "time_to_accuracy", "adaptation", "distributed"):
        assert [c for c in report["steps"][name]["checks"] if c["target"] == "required"], name


def test_dry_run_figures_are_finite_numbers(dry_run):
    _, report = dry_run
    steps = report["steps"]
    for name, step in steps.items():
        for path, number in numbers_in(step["figures"], name):
            assert math.isfinite(number), path
    expected = {
        "fast_path": ["bf16: logits_rel_error", "bf16: grad_rel_error", "fp16+GradScaler: grad_rel_error"],
        "benchmark": ["ours_eager_fp32: train_step_ms", "ours_eager_fp32: inference_s_per_volume",
                      "attention_unet: train_step_ms", "dynunet: train_step_ms", "loader: loader_step_ratio"],
        "time_to_accuracy": ["epochs_completed", "first_epoch_s", "later_epoch_median_s"],
        "adaptation": ["train_seconds", "seconds", "reference_dice_parent", "reference_dice_adapted"],
        "environment": ["cpu_cores"],
    }
    for name, keys in expected.items():
        for key in keys:
            value = steps[name]["figures"].get(key)
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, value)
    assert steps["time_to_accuracy"]["figures"]["epochs_completed"] == 2
    for name in ("time_to_accuracy", "distributed"):
        test_dice = steps[name]["figures"]["test_dice"]
        assert set(test_dice) == {"background", "body", "bone", "bladder", "rectum", "prostate"}, name
        assert all(0.0 <= d <= 1.0 for d in test_dice.values() if d is not None), name


def test_dry_run_reports_targets_without_judging_them(dry_run):
    _, report = dry_run
    targets = [c for step in report["steps"].values() for c in step["checks"] if c["target"] != "required"]
    assert len(targets) >= 8  # five from bench.py, two from time to accuracy, one from adaptation
    assert all(c["passed"] is None and c["note"] == "not judged on CPU" for c in targets), targets
    assert report["targets"]["train_step_ms"] == 60.0 and report["targets"]["compile_s"] == 40.0


def test_dry_run_prints_the_markdown_table(dry_run):
    finished, report = dry_run
    assert TABLE_HEADER in finished.stdout
    assert report["markdown"].splitlines()[0] == TABLE_HEADER
    table = finished.stdout[finished.stdout.index(TABLE_HEADER):]
    for title in gpu_check.TITLES.values():
        assert f"| {title} (" in table, title
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert all(line.count("|") == 6 for line in rows), rows


def test_steps_without_time_left_are_cut_short_not_run(tmp_path):
    out = tmp_path / "report.json"
    finished = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--minutes", "0.01", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert steps["environment"]["status"] == "ran"
    for name in gpu_check.STEPS[1:]:
        assert steps[name]["status"] == "cut short", name
        assert steps[name]["commands"] == [], name


def test_a_command_past_its_limit_is_stopped(tmp_path):
    started = time.monotonic()
    finished = gpu_check.run_command([sys.executable, "-c", "import time; print('started', flush=True); "
                                      "time.sleep(120)"], tmp_path / "sleep.log", limit_s=2)
    assert finished.stopped == "budget"
    assert time.monotonic() - started < 30
    assert finished.lines and finished.lines[0][1] == "started"
    step = gpu_check.StepReport("benchmark")
    gpu_check.record_command(step, finished, tmp_path / "sleep.log")
    step.settle()
    assert step.status == "cut short"


def test_targets_fail_only_where_judged():
    step = gpu_check.StepReport("benchmark")
    step.target("step", 70.0, 60.0, unit=" ms")
    step.settle()
    assert step.status == "failed" and step.checks[0]["passed"] is False

    step = gpu_check.StepReport("benchmark")
    step.target("speed-up", 4.0, 3.5, at_most=False)
    step.target("not reached", None, 180.0)  # judged and not measured: a failure, never a pass
    step.settle()
    assert [c["passed"] for c in step.checks] == [True, False] and step.status == "failed"

    step = gpu_check.StepReport("benchmark")
    step.target("step", 700.0, 60.0, judged=False)
    step.require("exit 0", True)
    step.settle()
    assert step.status == "ran" and step.checks[0]["note"] == "not judged on CPU"


def test_fast_path_comparison_catches_wrong_gradients():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 8, 8, 4)
    gradients = {"enc1.conv.weight": torch.randn(4, 1, 3, 3, 3), "head.weight": torch.randn(6, 4, 1, 1, 1)}
    reference = gpu_check.StepOutput(logits, gradients, 1.0, 0)
    close = gpu_check.StepOutput(logits * 1.001, {k: v * 1.01 for k, v in gradients.items()}, 1.0, 0)
    result = gpu_check.compare_steps(close, reference)
    assert result["logits_rel_error"] < gpu_check.TOLERANCE["logits"]
    assert result["grad_rel_error"] < gpu_check.TOLERANCE["gradients"]
    broken = dict(gradients, **{"enc1.conv.weight": torch.randn(4, 1, 3, 3, 3)})
    result = gpu_check.compare_steps(gpu_check.StepOutput(logits, broken, 1.0, 0), reference)
    assert result["grad_rel_error"] > gpu_check.TOLERANCE["gradients"]
    assert result["worst_block"] == "enc1"


@pytest.mark.parametrize("gpu_gib", [16, 80, 141])
def test_out_of_memory_size_needs_twice_the_gpu(gpu_gib):
    size = gpu_check.impossible_size(gpu_gib * 2**30)
    assert all(s % 16 == 0 for s in size) and size[0] == size[1] == 2 * size[2]
    assert math.prod(size) * gpu_check.BYTES_PER_VOXEL_AT_LEAST >= 2 * gpu_gib * 2**30
