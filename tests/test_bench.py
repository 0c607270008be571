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

from tools.bench import dynunet_strides  # noqa: E402


def test_dynunet_strides_follow_nnunet():
    assert dynunet_strides((256, 256, 128)) == [[1, 1, 1]] + [[2, 2, 2]] * 5
    # An axis stops halving once it would fall below 4 voxels (or become odd).
    assert dynunet_strides((64, 64, 32)) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1]]


OURS_CPU = ("ours_eager_fp32", "ours_bf16", "ours_cl_fp32", "ours_bf16_cl")


def test_smallest_cpu_run_writes_complete_json(tmp_path):
    # About 20 s on 2 cores: tiny volume, narrow network, one timed step, no loader workers.
    out = tmp_path / "bench.json"
    channels = (8, 16, 32, 64)
    command = [sys.executable, "-m", "tools.bench", "--device", "cpu", "--size", "32", "32", "16", "--warmup", "2",
               "--repeats", "1", "--cases", "2", "--workers", "0", "--channels", *map(str, channels),
               "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "train ms" in finished.stdout and "Loader" in finished.stdout

    report = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "monai", "size", "configs", "loader", "targets", "wall_s"):
        assert key in report
    assert report["device"] == "cpu"
    assert report["size"] == [32, 32, 16] and report["roi"] == [32, 32, 16]
    assert (report["warmup"], report["repeats"]) == (2, 1)
    configs = report["configs"]
    assert {"ours_eager_fp32", "attention_unet", "dynunet"} <= set(configs)
    # On the CPU there is no CUDA fast path; ours_compiled only with --compile.
    assert {"ours_cl_fp32"} <= set(configs) <= {"ours_eager_fp32", "ours_bf16", "ours_cl_fp32", "ours_bf16_cl",
                                                "attention_unet", "dynunet"}
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
    for name in OURS_CPU:
        if name in configs:
            assert configs[name]["parameters"] == ours, name
    assert configs["attention_unet"]["parameters"] == parameters(AttentionUnet(
        spatial_dims=3, in_channels=1, out_channels=6, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2)))
    # nnU-Net's strides for 32 x 32 x 16, by hand: z stops halving at 4 voxels.
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1], [1, 1, 1]]
    assert configs["dynunet"]["parameters"] == parameters(DynUNet(
        spatial_dims=3, in_channels=1, out_channels=6, kernel_size=[3] * 6, strides=strides,
        upsample_kernel_size=strides[1:], filters=(32, 64, 128, 256, 320, 320),
        norm_name=("INSTANCE", {"affine": True}), deep_supervision=False, res_block=False))
    assert eager["precision"] == "float32" and attention["precision"] == "float32"  # MONAI's nets: fp32 on CPUs
    if "ours_bf16" in configs:
        assert configs["ours_bf16"]["precision"] == "bfloat16"
    assert configs["ours_cl_fp32"]["channels_last"] is True and configs["ours_cl_fp32"]["precision"] == "float32"

    loader = report["loader"]
    assert "error" not in loader, loader.get("error")
    for key in ("samples_per_s", "step_on_device_ms", "step_with_loader_ms", "loader_step_ratio"):
        assert loader[key] > 0, key
    assert loader["loader_step_ratio"] == pytest.approx(loader["step_with_loader_ms"] / loader["step_on_device_ms"],
                                                        rel=1e-9)
    # The loader is measured with the fastest of our CPU configurations.
    ours_cpu = [n for n in OURS_CPU if n in configs]
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
