"""gpu_check.py: its --dry-run end to end on the CPU (so the GPU check never rots between GPU
spells), the time budget, and the pieces that decide pass or fail."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project is a set of scripts, not an installed package
    sys.path.insert(0, str(REPO))

import gpu_check  # noqa: E402

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
    finished = subprocess.run([sys.executable, "gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
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


def test_dry_run_bench_writes_complete_json(dry_run):
    """bench.py's smallest CPU run, the dry run's benchmark step (tiny volume, narrow network, one
    timed step, no loader workers): its JSON checked in full against what is computed here."""
    _, report = dry_run
    (command,) = report["steps"]["benchmark"]["commands"]
    assert command["returncode"] == 0, command
    argv = shlex.split(command["command"])
    channels = (8, 16, 32, 64)
    assert argv[1:argv.index("--out")] == ["bench.py", "--device", "cpu", "--size", "48", "32", "16", "--warmup", "2",
                                           "--repeats", "1", "--cases", "2", "--workers", "0",
                                           "--channels", *map(str, channels)]
    output = Path(command["log"]).read_text()  # the run's stdout and stderr
    assert "train ms" in output and "Loader" in output

    report = json.loads(Path(argv[argv.index("--out") + 1]).read_text())
    for key in ("device", "device_name", "torch", "monai", "size", "configs", "loader", "targets", "wall_s"):
        assert key in report
    assert report["device"] == "cpu"
    assert report["size"] == [48, 32, 16] and report["roi"] == [48, 32, 16]
    assert (report["warmup"], report["repeats"]) == (2, 1)
    configs = report["configs"]
    assert {"ours_eager_fp32", "attention_unet", "dynunet"} <= set(configs)
    # On the CPU there is no CUDA fast path; ours_compiled only with --compile.
    assert set(configs) <= {"ours_eager_fp32", "ours_bf16", "attention_unet", "dynunet"}
    for name, result in configs.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        # One timed call each: the median, the minimum and the single recorded time are one number.
        assert len(result["train_step_ms_all"]) == 1 and len(result["inference_s_all"]) == 1, name
        assert result["train_step_ms"] == pytest.approx(result["train_step_ms_all"][0], abs=0.006), name
        assert result["train_step_ms_min"] == pytest.approx(result["train_step_ms"]), name
        assert result["inference_s_per_volume"] == pytest.approx(result["inference_s_all"][0], abs=6e-5), name
        assert result["train_step_ms"] > 0 and result["inference_s_per_volume"] > 0, name
        assert result["warmup_s"] > 0, name
        assert result["train_peak_bytes"] is None or result["train_peak_bytes"] >= 0

    # The ratios, recomputed from the step and inference times in the same file.
    eager, attention = configs["ours_eager_fp32"], configs["attention_unet"]
    for name, result in configs.items():
        assert result["train_speedup_vs_eager"] == pytest.approx(
            eager["train_step_ms"] / result["train_step_ms"], rel=1e-9), name
        assert result["inference_speedup_vs_eager"] == pytest.approx(
            eager["inference_s_per_volume"] / result["inference_s_per_volume"], rel=1e-9), name
        assert result["train_vs_attention_unet"] == pytest.approx(
            result["train_step_ms"] / attention["train_step_ms"], rel=1e-9), name
        assert result["inference_vs_attention_unet"] == pytest.approx(
            result["inference_s_per_volume"] / attention["inference_s_per_volume"], rel=1e-9), name
    # The networks really differ in speed, so a ratio taken against the wrong row shows.
    assert eager["train_step_ms"] != attention["train_step_ms"]

    # Parameter counts of the networks built here: ours at --channels, MONAI's nets at their own widths.
    from monai.networks.nets import AttentionUnet, DynUNet

    from modules import ImprovedUNet3D

    def parameters(network):
        return sum(p.numel() for p in network.parameters())

    ours = parameters(ImprovedUNet3D(in_channels=1, out_channels=6, channels=channels))
    assert ours != parameters(ImprovedUNet3D())  # --channels reached the network
    for name in ("ours_eager_fp32", "ours_bf16"):
        if name in configs:
            assert configs[name]["parameters"] == ours, name
    assert configs["attention_unet"]["parameters"] == parameters(AttentionUnet(
        spatial_dims=3, in_channels=1, out_channels=6, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2)))
    # nnU-Net's strides for 48 x 32 x 16, by hand: x stops halving at 6 voxels (3 is below 4), y and z at 4.
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1], [1, 1, 1]]
    assert configs["dynunet"]["parameters"] == parameters(DynUNet(
        spatial_dims=3, in_channels=1, out_channels=6, kernel_size=[3] * 6, strides=strides,
        upsample_kernel_size=strides[1:], filters=(32, 64, 128, 256, 320, 320),
        norm_name=("INSTANCE", {"affine": True}), deep_supervision=False, res_block=False))
    assert eager["precision"] == "float32" and attention["precision"] == "float32"  # MONAI's nets: fp32 on CPUs
    if "ours_bf16" in configs:
        assert configs["ours_bf16"]["precision"] == "bfloat16"

    loader = report["loader"]
    assert "error" not in loader, loader.get("error")
    for key in ("samples_per_s", "step_on_device_ms", "step_with_loader_ms", "loader_step_ratio"):
        assert loader[key] > 0, key
    assert loader["loader_step_ratio"] == pytest.approx(loader["step_with_loader_ms"] / loader["step_on_device_ms"],
                                                        rel=1e-9)
    # The loader is measured with the fastest of our CPU configurations.
    ours_cpu = [n for n in ("ours_eager_fp32", "ours_bf16") if n in configs]
    assert loader["config"] == min(ours_cpu, key=lambda n: configs[n]["train_step_ms"])
    assert (loader["augment"], loader["cases"], loader["workers"]) == ("device", 2, 0)

    # Every CPU target: each of our configurations against AttentionUnet, and the loader ratio,
    # with the verdict that the value and the limit give.
    targets = {t["target"]: t for t in report["targets"]}
    limits = report["target_limits"]
    expected = {f"{n}: inference time / AttentionUnet": (configs[n]["inference_vs_attention_unet"],
                                                          limits["cpu_inference_vs_attention_unet"])
                for n in ours_cpu}
    expected["step with loader / step on device"] = (loader["loader_step_ratio"], limits["loader_step_ratio"])
    assert set(targets) == set(expected)
    for name, (value, limit) in expected.items():
        assert targets[name]["value"] == pytest.approx(value) and targets[name]["limit"] == limit, name
        assert targets[name]["at_most"] is True
        assert targets[name]["passed"] == (value <= limit), name


def test_steps_without_time_left_are_cut_short_not_run(tmp_path):
    out = tmp_path / "report.json"
    finished = subprocess.run([sys.executable, "gpu_check.py", "--dry-run", "--minutes", "0.01", "--out", str(out)],
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
