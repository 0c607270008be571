"""bench.py: its smallest CPU run end to end in a subprocess, and nnU-Net's stride rule for DynUNet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project is a set of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import dynunet_strides  # noqa: E402


def test_dynunet_strides_follow_nnunet():
    assert dynunet_strides((256, 256, 128)) == [[1, 1, 1]] + [[2, 2, 2]] * 5
    # An axis stops halving once it would fall below 4 voxels (or become odd).
    assert dynunet_strides((64, 64, 32)) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1]]


def test_smallest_cpu_run_writes_complete_json(tmp_path):
    # About 20 s on 2 cores: tiny volume, narrow network, one timed step, no loader workers.
    out = tmp_path / "bench.json"
    command = [sys.executable, "bench.py", "--device", "cpu", "--size", "32", "32", "16", "--warmup", "2",
               "--repeats", "1", "--cases", "2", "--workers", "0", "--channels", "8", "16", "32", "64",
               "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "train ms" in finished.stdout and "Loader" in finished.stdout

    report = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "monai", "size", "configs", "loader", "targets", "wall_s"):
        assert key in report
    assert report["size"] == [32, 32, 16]
    configs = report["configs"]
    assert {"ours_eager_fp32", "attention_unet", "dynunet"} <= set(configs)
    for name, result in configs.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        for key in ("train_step_ms", "inference_s_per_volume", "train_speedup_vs_eager", "inference_vs_attention_unet"):
            assert result[key] > 0, (name, key)
        assert result["parameters"] > 0
        assert result["train_peak_bytes"] is None or result["train_peak_bytes"] >= 0
    assert configs["ours_eager_fp32"]["train_speedup_vs_eager"] == pytest.approx(1.0)
    assert configs["attention_unet"]["inference_vs_attention_unet"] == pytest.approx(1.0)
    loader = report["loader"]
    assert "error" not in loader, loader.get("error")
    for key in ("samples_per_s", "step_on_device_ms", "step_with_loader_ms", "loader_step_ratio"):
        assert loader[key] > 0, key
