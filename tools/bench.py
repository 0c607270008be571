"""Benchmark our training step, peak memory, whole-volume inference and data loader side by side,
in one process, against MONAI's AttentionUnet and DynUNet and against our own plain eager float32
path; prints a table of ratios and writes everything to JSON.

    python -m tools.bench --device cpu     # 64 x 64 x 32, a few steps: 1-2 minutes on 2 cores
    python -m tools.bench --device cuda    # the whole HipMRI volume, 256 x 256 x 128

Every network gets the same input tensor, the same random labels and the same training step:
forward, MONAI DiceCELoss (6 classes, computed in float32 as train.py does), backward and an Adam
step. Configurations:

  ours_eager_fp32         ImprovedUNet3D in plain eager float32: the baseline of the speed ratios
  ours_fast               CUDA: bf16 autocast + channels_last_3d + regional torch.compile (train.py's path)
  ours_fast_checkpointing CUDA: the same with gradient checkpointing (the memory-saving choice)
  ours_bf16               CPU with native bf16 (oneDNN): bf16 autocast, eager
  ours_cl_fp32            CPU: float32 with channels_last_3d (train.py uses it on CUDA only)
  ours_bf16_cl            CPU with native bf16: bf16 autocast with channels_last_3d
  ours_compiled           CPU, with --compile only: float32 + regional torch.compile
  attention_unet          MONAI AttentionUnet, channels 32..512, eager
  dynunet                 MONAI DynUNet in nnU-Net's configuration, eager

MONAI's nets run with bf16 autocast on CUDA (train.py's default) and in float32 on the CPU, so on
the CPU the like-for-like comparison against AttentionUnet is ours_eager_fp32's. ours_bf16 is what
train.py and predict.py use on CPUs with native bf16 instructions (inference.autocast_dtype); the
CPU fast path is whichever of our CPU configurations is fastest; compiling
costs minutes on a small machine, hence --compile.

On the CPU, ONNX Runtime runs the same inference side by side with PyTorch: our network at
--channels with the same weights, exported as export.py exports model.onnx, through the same
Gaussian sliding window (--roi, --overlap) and softmax as predict.py; both in float32 with the same
number of threads, the timed calls alternating. The ratio is ONNX Runtime's time over PyTorch's
(below 1: ONNX Runtime is faster). Skipped, with the reason in the JSON, on CUDA, without
onnxruntime, or with a --roi that is not a multiple of 16 (the graph's constraint).

The loader part writes phantom cases (phantom.py) to a temporary folder and feeds train.py's
pipeline (cached_dataset, augmentation and, with --augment device as in train.py, the batched
DeviceAugmentation on the device) into the fastest of our configurations: the step with the
loader is compared with the bare step on tensors already on the device.

Timings are medians of timed calls after warm-up (compilation happens in the warm-up, whose
seconds are reported separately); the timed calls alternate between configurations, so a change
in machine load hits all of them alike. Peak memory is what a configuration adds on top of the shared inputs:
on CUDA the allocator's peak (torch.cuda.max_memory_allocated); on the CPU the peak resident set
size growth, sampled every few milliseconds in a thread (the CPU allocator has no peak counter;
freed heap is returned with malloc_trim first so earlier configurations do not hide it).
"""

from __future__ import annotations

import os

# OpenMP threads sleep instead of spinning at barriers. On a small or shared CPU machine spinning
# threads starve each other: measured on 2 busy cores, 2 spinning threads ran a training step 5x
# slower than 1 thread. Set before torch is imported (libgomp reads it once); the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 - after the environment above, on purpose
import ctypes
import gc
import json
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import AttentionUnet, DynUNet

from dataset import (CLASS_NAMES, DeviceAugmentation, augmentation, cached_dataset, drop_trailing_singletons,
                     find_cases, lps_geometry, preprocessing, voxel_spacing)
from modules import ImprovedUNet3D, count_parameters
from pelvicseg.atomic import write_text
from pelvicseg.inference import autocast_dtype, cpu_has_native_bf16, predict_probabilities, resolve_device
from pelvicseg.training import Trainer

NUM_CLASSES = len(CLASS_NAMES)
GIB = 2**30
# Defaults per device: (size, warm-up steps, timed steps, loader volumes, loader workers).
DEFAULTS = {
    "cpu": ((64, 64, 32), 2, 3, 4, 1),
    "cuda": ((256, 256, 128), 3, 15, 8, min(8, os.cpu_count() or 1)),
}
# The targets (set for one H100 at 256 x 256 x 128; elsewhere the checks are informative).
TARGETS = {
    "train_step_ms": 60.0,
    "train_peak_gib": 8.0,
    "speedup_vs_eager": 3.5,
    "loader_step_ratio": 1.10,
    "inference_s_per_volume": 0.3,
    "cpu_inference_vs_attention_unet": 1.5,
}
# Measured on one H100 at 256 x 256 x 128 before this script existed: (train step ms, peak GiB).
ANCHORS_H100 = {
    "ours_eager_fp32": (387, 28.4),
    "ours_fast": (98, 12.5),
    "attention_unet": (283, 10.4),
    "dynunet": (210, 9.3),
}


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark training step time, peak memory, inference time and "
                                     "loader throughput of the 3D Improved UNet against MONAI's AttentionUnet "
                                     "and DynUNet and against our plain eager float32 path.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run; the defaults of the flags below depend on it")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="input volume size in the stored array order (default: 64 64 32 on cpu, "
                        "256 256 128, a whole HipMRI volume, on cuda); each a multiple of 16 for AttentionUnet")
    parser.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="sliding-window size for inference (default: --size, one Gaussian-weighted window)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (predict.py's default)")
    parser.add_argument("--warmup", type=int, help="untimed training steps before timing, at least 2, over which "
                        "peak memory is taken: the first allocates Adam's state (and compiles), the second is the "
                        "first with the previous gradients alive, like every later one (default: 2 cpu, 3 cuda)")
    parser.add_argument("--repeats", type=int, help="timed training steps and inferences per configuration "
                        "(default: 3 on cpu, 15 on cuda); the median is reported")
    parser.add_argument("--channels", type=int, nargs=4, default=(32, 64, 128, 256), metavar="C",
                        help="widths of our network's four resolution steps (MONAI's nets keep theirs)")
    parser.add_argument("--compile", action="store_true",
                        help="on the CPU also measure regional torch.compile (compiling takes many minutes on "
                        "a small machine; on cuda the fast path is always compiled)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--cases", type=int, help="phantom volumes for the loader benchmark (default: 4 cpu, 8 cuda)")
    parser.add_argument("--augment", choices=("device", "loader"), default="device",
                        help="train.py's --augment for the loader benchmark: augmentation batched on the training "
                        "device (train.py's default), or per sample with MONAI transforms in the loader workers")
    parser.add_argument("--workers", type=int, help="data-loading worker processes (default: 1 on cpu, "
                        "min(8, cores) on cuda)")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs, labels and weights")
    parser.add_argument("--out", default="runs/bench.json", help="JSON file for all results (runs/ is not tracked)")
    args = parser.parse_args(argv)
    size, warmup, repeats, cases, workers = DEFAULTS[args.device]
    args.size = list(args.size or size)
    args.roi = list(args.roi or args.size)
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    args.cases = cases if args.cases is None else args.cases
    args.workers = workers if args.workers is None else args.workers
    args.channels = list(args.channels)
    if args.repeats < 1 or args.warmup < 2 or args.cases < 1 or args.workers < 0 or (args.threads or 1) < 1:
        parser.error("--repeats, --cases and --threads must be >= 1, --warmup >= 2 and --workers >= 0")
    if any(s < 8 for s in args.size) or any(r > s for r, s in zip(args.roi, args.size)):
        parser.error(f"--size {args.size} must be >= 8 on every axis and --roi {args.roi} no larger than it")
    return args


# ----------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Config:
    name: str  # key in the JSON
    label: str  # row of the table
    network: str  # "ours", "attention_unet" or "dynunet"
    amp: bool = False  # bf16 autocast (fp16 on GPUs without bf16)
    channels_last: bool = False
    compile: bool = False  # regional: each of model.blocks() compiled, as train.py does
    checkpointing: bool = False


def configurations(device: torch.device, compile_on_cpu: bool) -> list[Config]:
    cuda = device.type == "cuda"
    configs = [Config("ours_eager_fp32", "ours, eager fp32 (baseline)", "ours")]
    if cuda:
        configs += [
            Config("ours_fast", "ours, bf16+CL+compile", "ours", amp=True, channels_last=True, compile=True),
            Config("ours_fast_checkpointing", "ours, bf16+CL+compile+ckpt", "ours", amp=True, channels_last=True,
                   compile=True, checkpointing=True),
        ]
    else:
        if cpu_has_native_bf16():  # the one answer train.py and predict.py use
            configs.append(Config("ours_bf16", "ours, bf16 autocast", "ours", amp=True))
        # channels_last_3d is train.py's CUDA layout; measured here to decide whether the CPU gets it too
        configs.append(Config("ours_cl_fp32", "ours, fp32 + channels_last_3d", "ours", channels_last=True))
        if cpu_has_native_bf16():
            configs.append(Config("ours_bf16_cl", "ours, bf16 + channels_last_3d", "ours", amp=True,
                                  channels_last=True))
        if compile_on_cpu:
            configs.append(Config("ours_compiled", "ours, fp32 + compile", "ours", compile=True))
    # MONAI's nets run eager, in the precision train.py uses on this device.
    configs += [Config("attention_unet", "MONAI AttentionUnet", "attention_unet", amp=cuda),
                Config("dynunet", "MONAI DynUNet (nnU-Net)", "dynunet", amp=cuda)]
    return configs


def amp_dtype_for(config: Config, device: torch.device) -> torch.dtype | None:
    """inference.autocast_dtype on CUDA (bf16, or fp16 where bf16 is missing); it gives None on the
    CPU, where the bench asks for bf16 explicitly."""
    if not config.amp:
        return None
    return autocast_dtype(device) if device.type == "cuda" else torch.bfloat16


def dynunet_strides(size: Sequence[int], levels: int = 6, min_size: int = 4) -> list[list[int]]:
    """nnU-Net's rule: halve an axis at each level while it stays even and >= ``min_size`` voxels
    (so 256 x 256 x 128 gives [1, 2, 2, 2, 2, 2] on every axis)."""
    strides, current = [[1, 1, 1]], [int(s) for s in size]
    for _ in range(levels - 1):
        step = [2 if s % 2 == 0 and s // 2 >= min_size else 1 for s in current]
        current = [s // k for s, k in zip(current, step)]
        strides.append(step)
    return strides


def build_network(config: Config, size: Sequence[int], channels: Sequence[int]) -> torch.nn.Module:
    if config.network == "ours":
        return ImprovedUNet3D(in_channels=1, out_channels=NUM_CLASSES, channels=channels,
                              gradient_checkpointing=config.checkpointing)
    if config.network == "attention_unet":
        return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                             channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2))
    if config.network == "dynunet":
        strides = dynunet_strides(size)
        # nnU-Net 3d_fullres: 3x3x3 kernels at 6 levels, filters capped at 320, instance norm, LeakyReLU.
        return DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, kernel_size=[3] * 6,
                       strides=strides, upsample_kernel_size=strides[1:], filters=(32, 64, 128, 256, 320, 320),
                       norm_name=("INSTANCE", {"affine": True}), deep_supervision=False, res_block=False)
    raise ValueError(f"unknown network {config.network!r}")


# ----------------------------------------------------------------------------- measuring

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # glibc keeps freed heap; give it back so the next RSS baseline is honest
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: CPU memory is reported as n/a


class PeakMemory:
    """Peak memory added by the work inside ``with``, in bytes (None where it cannot be measured)."""

    def __init__(self, device: torch.device, interval_s: float = 0.003):
        self.device, self.interval_s = device, interval_s
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = resident_bytes()
        self.peak = self.base
        self.stop = threading.Event()
        if self.base is not None:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, resident_bytes() or 0)

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, resident_bytes() or 0)
            self.bytes = self.peak - self.base
        return False


def time_calls(call: Callable[[], object], count: int, device: torch.device) -> list[float]:
    """Seconds of each of ``count`` calls, each waited for on the device."""
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def make_trainer(model, amp_dtype) -> Trainer:
    """train.py's Trainer (its step: autocast forward, float32 loss, GradScaler for fp16, gradient
    clipping, the non-finite guard, Adam), with an unweighted Dice + cross-entropy loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=amp_dtype == torch.float16)
    return Trainer(model, optimizer, scaler, DiceCELoss(to_onehot_y=True, softmax=True), "combined", amp_dtype)


def train_step(trainer: Trainer, image, label) -> float:
    """One ``Trainer.step``, the very step train.py takes."""
    return trainer.step(image, label).loss


def model_input(image: torch.Tensor, config: Config) -> torch.Tensor:
    return image.contiguous(memory_format=torch.channels_last_3d) if config.channels_last else image


def median_ms(seconds: Sequence[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def error_text(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


class Run:
    """One configuration being measured: its model, optimizer and training step, and its results.

    Built and warmed up one at a time; peak memory is taken over the warm-up (see --warmup), whose
    last step is already a steady-state step. Then the timed steps of all runs alternate, so that
    a change in machine load during the benchmark hits every configuration alike.
    """

    def __init__(self, config: Config, image: torch.Tensor, label: torch.Tensor, args, device: torch.device):
        self.config, self.device, self.image, self.args = config, device, image, args
        self.result = {"label": config.label, **asdict(config)}
        with PeakMemory(device) as memory:
            torch.manual_seed(args.seed)  # every configuration of one network starts from the same weights
            self.model = build_network(config, args.size, args.channels).to(device)
            if config.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last_3d)
            if config.compile:
                for block in self.model.blocks():
                    block.compile()  # regional, as train.py: each block compiled once, reused per call
            self.amp_dtype = amp_dtype_for(config, device)
            self.trainer = make_trainer(self.model, self.amp_dtype)
            self.x, self.label = model_input(image, config), label
            warmup_s = time_calls(self.train_step, args.warmup, device)
        self.result.update(parameters=count_parameters(self.model), warmup_s=round(sum(warmup_s), 3),
                           precision=str(self.amp_dtype or torch.float32).replace("torch.", ""),
                           train_peak_bytes=memory.bytes)
        self.train_s: list[float] = []
        self.inference_s: list[float] = []

    def train_step(self) -> torch.Tensor:
        return train_step(self.trainer, self.x, self.label)

    def infer(self) -> torch.Tensor:
        """predict.py's whole-volume inference: Gaussian-weighted sliding window, softmax."""
        return predict_probabilities(self.model, self.image, self.args.roi, self.args.overlap, False, self.amp_dtype)

    def start_inference(self) -> None:
        """Eval mode, and one untimed call where that is new work: a compiled model meets eval mode
        and no_grad for the first time; on CUDA a call is cheap. On the CPU eager kernels are warm
        from the training steps."""
        self.model.eval()
        if self.config.compile or self.device.type == "cuda":
            time_calls(self.infer, 1, self.device)

    def timed(self, call: Callable[[], object], measure_memory: bool) -> tuple[float, int | None]:
        if not measure_memory:
            return time_calls(call, 1, self.device)[0], None
        with PeakMemory(self.device) as memory:
            seconds = time_calls(call, 1, self.device)[0]
        return seconds, memory.bytes

    def finish(self) -> dict:
        if self.train_s:
            self.result.update(train_step_ms=median_ms(self.train_s), train_step_ms_min=1000 * min(self.train_s),
                               train_step_ms_all=[round(1000 * s, 2) for s in self.train_s])
        if self.inference_s:
            self.result.update(inference_s_per_volume=statistics.median(self.inference_s),
                               inference_s_min=min(self.inference_s),
                               inference_s_all=[round(s, 4) for s in self.inference_s])
        return self.result


def start_run(config: Config, image, label, args, device) -> Run | dict:
    """A warmed-up Run, or the failure as a result row: one failing configuration never stops the
    benchmark. A configuration that fails with torch.compile is reported and measured eager instead."""
    compile_error = None
    if config.compile:
        try:
            return Run(config, image, label, args, device)
        except Exception as error:  # noqa: BLE001 - reported, then the eager fallback below
            compile_error = error_text(error)
        # Out of the except block: the failed model is no longer held by the traceback.
        print(f"  {config.name} failed with torch.compile ({compile_error}); measuring it eager instead", flush=True)
        torch._dynamo.reset()
        release_memory(device)
        config = replace(config, compile=False)
    try:
        run = Run(config, image, label, args, device)
    except Exception as error:  # noqa: BLE001 - recorded in the JSON and the table
        message = error_text(error)
        print(f"  {config.name} failed: {message}", flush=True)
        return {"label": config.label, **asdict(config), "error": message}
    if compile_error is not None:
        run.result["compile_error"] = compile_error
    return run


def measure_configs(configs: Sequence[Config], image, label, args, device) -> dict[str, dict]:
    """Training step time and peak memory, then whole-volume inference time, for every configuration,
    with the timed calls alternating between configurations."""
    results, runs = {}, {}
    for config in configs:
        print(f"  building and warming up {config.name} ...", flush=True)
        started = start_run(config, image, label, args, device)
        release_memory(device)
        if isinstance(started, Run):
            runs[config.name] = started
        else:
            results[config.name] = started

    def alternate(phase: str, call_of: Callable[[Run], Callable[[], object]], times_of, memory_key: str | None):
        for round_index in range(args.repeats):
            for name, run in list(runs.items()):
                try:
                    seconds, peak = run.timed(call_of(run), measure_memory=memory_key is not None and round_index == 0)
                except Exception as error:  # noqa: BLE001 - e.g. out of memory: recorded, the others go on
                    print(f"  {name} failed in {phase}: {error_text(error)}", flush=True)
                    run.result["error"] = f"{phase}: {error_text(error)}"
                    results[name] = run.finish()
                    del runs[name]
                    release_memory(device)
                    continue
                times_of(run).append(seconds)
                if memory_key is not None and round_index == 0:
                    run.result[memory_key] = peak

    print(f"  timing {args.repeats} training step(s) of each, alternating ...", flush=True)
    alternate("training", lambda run: run.train_step, lambda run: run.train_s, None)
    print(f"  timing {args.repeats} whole-volume inference(s) of each, alternating ...", flush=True)
    for name, run in list(runs.items()):
        run.trainer.optimizer.zero_grad(set_to_none=True)  # gradients are not needed any more: free them
        try:
            run.start_inference()
        except Exception as error:  # noqa: BLE001
            run.result["error"] = f"inference: {error_text(error)}"
            results[name] = run.finish()
            del runs[name]
    alternate("inference", lambda run: run.infer, lambda run: run.inference_s, "inference_peak_bytes")
    for name, run in runs.items():
        results[name] = run.finish()
    runs.clear()
    release_memory(device)
    # Keep the order of the configurations whatever failed when.
    return {c.name: results[c.name] for c in configs if c.name in results}


# ----------------------------------------------------------------------------- loader

def write_cases(folder: Path, count: int, shape: Sequence[int], seed: int) -> None:
    """``count`` HipMRI-named image/label pairs of ``shape``: the phantom when phantom.py is there,
    otherwise blocky random labels with matching intensities."""
    try:
        from pelvicseg.phantom import write_phantom
    except ImportError:
        write_phantom = None
    if write_phantom is not None:
        write_phantom(folder, patients=count, weeks=1, shape=tuple(shape), seed=seed)
        return
    rng = np.random.default_rng(seed)
    affine = np.diag([-1.68, -1.68, 1.56, 1.0])  # LPS, as HipMRI stores it: no reorientation cost
    for index in range(count):
        coarse = rng.integers(0, NUM_CLASSES, size=[max(s // 8, 1) for s in shape])
        label = coarse
        for axis, s in enumerate(shape):
            label = np.repeat(label, -(-s // label.shape[axis]), axis=axis).take(range(s), axis=axis)
        image = (100.0 * label + rng.normal(0, 20, size=shape)).astype(np.float32)
        for sub, name, array in (("semantic_MRs_anon", f"Case_{index + 4:03d}_Week0_LFOV.nii.gz", image),
                                 ("semantic_labels_anon", f"Case_{index + 4:03d}_Week0_SEMANTIC_LFOV.nii.gz",
                                  label.astype(np.uint8))):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), str(folder / sub / name))


def measure_loader(config: Config, args, device: torch.device, image: torch.Tensor, label: torch.Tensor) -> dict:
    """(a) samples/s of train.py's loader alone; (b) the training step fed by that loader (plus the
    on-device augmentation with --augment device) against the bare step on tensors already on the
    device, with the same model: the ratio is what data feeding adds to a step."""
    result = {"config": config.name, "augment": args.augment, "cases": args.cases, "workers": args.workers}
    on_device = args.augment == "device"
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as folder:
        start = time.perf_counter()
        write_cases(Path(folder), args.cases, args.size, args.seed)
        # train.py's pipeline on whole volumes (as in the full-size step), resampled to their
        # own spacing so that they keep --size; no crop, as train.py without --patch-size.
        cases = find_cases(folder)
        cache = cached_dataset(cases, lps_geometry(cases[0].image)[1], NUM_CLASSES, workers=max(args.workers, 1))
        result["prepare_s"] = round(time.perf_counter() - start, 2)
        data = Dataset(cache, transform=augmentation(None, NUM_CLASSES, None, on_device))
        device_augmentation = DeviceAugmentation() if on_device else None
        generator = torch.Generator(device).manual_seed(args.seed)
        # One endless epoch: no epoch boundary (and worker restart) falls inside the timing.
        sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=10**6)
        loader = DataLoader(data, batch_size=1, sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        batches = iter(loader)
        try:
            next(batches)  # worker start-up is not throughput
            count = max(8, 4 * args.workers)
            start = time.perf_counter()
            for _ in range(count):
                next(batches)
            result["samples_per_s"] = count / (time.perf_counter() - start)

            run = Run(config, image, label, args, device)  # the same model for both, warmed up

            def loader_step():
                batch = next(batches)
                images = batch["image"].to(device, non_blocking=True).as_tensor()
                labels = batch["label"].to(device, non_blocking=True).as_tensor()
                if device_augmentation is not None:
                    images, labels = device_augmentation(images, labels, generator)
                return train_step(run.trainer, model_input(images, config), labels)

            on_device_s = time_calls(run.train_step, args.repeats, device)
            # Drain what the workers prefetched while we were busy, so the timed steps see the
            # loader's steady state rather than a full queue.
            prefetched = 2 * args.workers  # DataLoader's default prefetch_factor is 2 per worker
            time_calls(loader_step, prefetched + 1, device)
            loader_s = time_calls(loader_step, max(args.repeats, 2 * args.workers), device)
            del run
        finally:
            del batches  # stops the workers
    result.update(step_on_device_ms=median_ms(on_device_s), step_with_loader_ms=median_ms(loader_s),
                  step_with_loader_ms_all=[round(1000 * s, 2) for s in loader_s])
    result["loader_step_ratio"] = result["step_with_loader_ms"] / result["step_on_device_ms"]
    return result


# ----------------------------------------------------------------------------- validation

def measure_validation(args) -> dict:
    """What one validation volume costs after its sliding window, side by side in this process on
    one phantom case of --size: per-epoch model selection on the preprocessed grid (arg-max and
    Dice against the preprocessed label, train.py's ``validate``) against the same on the source
    grid (probabilities resampled back, arg-max, Dice: the earlier per-epoch validation), and the
    final validation's HD95 of the foreground classes (``metrics.hd95_per_class``) against all
    six classes (MONAI's HD95 with the background too, the earlier cost). Probabilities are the
    one-hot label blurred, so the arg-max has borders to find."""
    from pelvicseg.inference import labels_from_probabilities, to_source_grid
    from pelvicseg.metrics import dice_per_class, hd95_per_class
    from monai.metrics import compute_hausdorff_distance

    with tempfile.TemporaryDirectory(prefix="bench_validation_") as folder:
        write_cases(Path(folder), 1, args.size, args.seed)
        case = find_cases(folder)[0]
        spacing = [2 * s for s in lps_geometry(case.image)[1]]  # train.py's default: half resolution
        item = preprocessing(spacing, NUM_CLASSES)(case.as_dict())
        source_label = drop_trailing_singletons(np.asanyarray(nib.load(case.label).dataobj)).astype(np.int64)
        source_spacing = voxel_spacing(nib.load(case.image).affine)
    label = item["label"][0].long()
    one_hot = torch.nn.functional.one_hot(label, NUM_CLASSES).permute(3, 0, 1, 2).float()[None]
    probabilities = torch.softmax(4 * torch.nn.functional.avg_pool3d(one_hot, 3, 1, 1), dim=1)[0]

    def preprocessed_grid():
        return dice_per_class(probabilities.argmax(0), label, NUM_CLASSES)

    def source_grid():
        return dice_per_class(labels_from_probabilities(to_source_grid(probabilities, item["image"])), source_label,
                              NUM_CLASSES)

    prediction = labels_from_probabilities(to_source_grid(probabilities, item["image"]))

    def hd95_all_classes():
        with warnings.catch_warnings():  # MONAI's own deprecation notice, and "class is all 0"
            warnings.simplefilter("ignore")
            return [compute_hausdorff_distance(torch.as_tensor(prediction == c)[None, None],
                                               torch.as_tensor(source_label == c)[None, None], percentile=95,
                                               spacing=list(source_spacing)) for c in range(NUM_CLASSES)]

    def hd95_foreground():
        return hd95_per_class(prediction, source_label, NUM_CLASSES, source_spacing)

    repeats = max(1, min(args.repeats or 3, 3))
    timed = {}
    for name, call in (("preprocessed_grid", preprocessed_grid), ("source_grid", source_grid),
                       ("hd95_foreground", hd95_foreground), ("hd95_all_classes", hd95_all_classes)):
        call()  # warm-up
        timed[name] = statistics.median(_seconds(call) for _ in range(repeats))
    return {"size": list(args.size), "preprocessed_shape": list(label.shape), "spacing_mm": spacing,
            **{f"{name}_s": round(value, 4) for name, value in timed.items()},
            "source_over_preprocessed": round(timed["source_grid"] / timed["preprocessed_grid"], 2),
            "hd95_all_over_foreground": round(timed["hd95_all_classes"] / timed["hd95_foreground"], 2)}


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- ONNX Runtime

def measure_onnx(args, device: torch.device, image: torch.Tensor) -> dict:
    """Whole-volume CPU inference through ONNX Runtime and through PyTorch (see the module
    docstring), with the largest difference between their probabilities."""
    if device.type != "cpu":
        return {"skipped": "ONNX Runtime is measured against PyTorch on the CPU only (--device cpu)"}
    try:
        import onnxruntime
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    if any(r % 2 ** ImprovedUNet3D.depth for r in args.roi):
        return {"skipped": f"--roi {args.roi}: the ONNX graph takes spatial sizes that are multiples of 16"}
    from monai.inferers import sliding_window_inference

    from pelvicseg.inference import export_onnx

    torch.manual_seed(args.seed)
    model = ImprovedUNet3D(in_channels=1, out_channels=NUM_CLASSES, channels=args.channels).eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        export_onnx(model, path)
        export_s = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # Sleeping, not spinning, between kernels, for the reason OMP_WAIT_POLICY is PASSIVE above.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def onnx_window(window: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": window.detach().cpu().contiguous().numpy()})[0])

    def onnx_infer() -> torch.Tensor:
        logits = sliding_window_inference(image, roi_size=tuple(args.roi), sw_batch_size=2, predictor=onnx_window,
                                          overlap=args.overlap, mode="gaussian")
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)

    def torch_infer() -> torch.Tensor:
        return predict_probabilities(model, image, args.roi, args.overlap, False, None)

    difference = float((onnx_infer() - torch_infer()).abs().max())  # also the warm-up of both
    onnx_s, torch_s = [], []
    for _ in range(args.repeats):
        onnx_s += time_calls(onnx_infer, 1, device)
        torch_s += time_calls(torch_infer, 1, device)
    result = {"onnxruntime": onnxruntime.__version__, "threads": threads, "export_s": round(export_s, 2),
              "onnxruntime_s_per_volume": statistics.median(onnx_s), "pytorch_s_per_volume": statistics.median(torch_s),
              "onnxruntime_s_all": [round(s, 4) for s in onnx_s], "pytorch_s_all": [round(s, 4) for s in torch_s],
              "max_probability_difference": difference}
    result["onnxruntime_vs_pytorch"] = result["onnxruntime_s_per_volume"] / result["pytorch_s_per_volume"]
    return result


# ----------------------------------------------------------------------------- report

def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def add_ratios(results: dict[str, dict]) -> None:
    """Speed-up of each configuration over our eager float32 path, and time relative to AttentionUnet,
    for training steps and for inference (each where both numbers exist)."""
    eager = results.get("ours_eager_fp32", {})
    attention = results.get("attention_unet", {})
    for result in results.values():
        for kind, metric in (("train", "train_step_ms"), ("inference", "inference_s_per_volume")):
            if result.get(metric) and eager.get(metric):
                result[f"{kind}_speedup_vs_eager"] = eager[metric] / result[metric]
            if result.get(metric) and attention.get(metric):
                result[f"{kind}_vs_attention_unet"] = result[metric] / attention[metric]


def fast_configs(results: dict[str, dict], device: torch.device) -> list[str]:
    """Names of our fast-path candidates that ran (on the CPU eager float32 is one of them)."""
    names = (["ours_fast", "ours_fast_checkpointing"] if device.type == "cuda"
             else ["ours_eager_fp32", "ours_bf16", "ours_cl_fp32", "ours_bf16_cl", "ours_compiled"])
    return [n for n in names if "train_step_ms" in results.get(n, {})]


def check_targets(results: dict[str, dict], loader: dict, device: torch.device) -> list[dict]:
    """Each of the issue's targets that applies to this device, with the measured value."""
    checks = []

    def check(name, value, limit, at_most=True):
        if value is not None:
            passed = value <= limit if at_most else value >= limit
            checks.append({"target": name, "value": value, "limit": limit, "at_most": at_most, "passed": passed})

    for name in fast_configs(results, device):
        result = results[name]
        if device.type == "cuda":
            check(f"{name}: train step ms", result["train_step_ms"], TARGETS["train_step_ms"])
            if result.get("train_peak_bytes") is not None:
                check(f"{name}: train peak GiB", result["train_peak_bytes"] / GIB, TARGETS["train_peak_gib"])
            check(f"{name}: speed-up vs eager fp32", result.get("train_speedup_vs_eager"),
                  TARGETS["speedup_vs_eager"], at_most=False)
            check(f"{name}: inference s/volume", result.get("inference_s_per_volume"),
                  TARGETS["inference_s_per_volume"])
        else:
            check(f"{name}: inference time / AttentionUnet", result.get("inference_vs_attention_unet"),
                  TARGETS["cpu_inference_vs_attention_unet"])
    if "loader_step_ratio" in loader:
        check("step with loader / step on device", loader["loader_step_ratio"], TARGETS["loader_step_ratio"])
    return checks


def format_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / GIB:.2f} GiB" if abs(value) >= GIB else f"{value / 2**20:.0f} MiB"


def print_report(report: dict) -> None:
    results, loader = report["configs"], report["loader"]
    print()
    print(f"Device: {report['device_name']}   torch {report['torch']}   monai {report['monai']}   "
          f"python {report['python']}")
    print(f"Input (1, 1, {', '.join(map(str, report['size']))}), {NUM_CLASSES} classes, DiceCELoss + Adam; "
          f"inference window {tuple(report['roi'])}, overlap {report['overlap']}; "
          f"median of {report['repeats']} after {report['warmup']} warm-up")
    memory_note = "peak GPU memory" if report["device"] == "cuda" else "peak RSS growth"
    header = (f"{'config':<34} {'train ms':>9} {'x faster':>9} {memory_note:>16} {'infer s/vol':>12} "
              f"{'infer/AttnUNet':>15}")
    print(header)
    print("-" * len(header))
    for result in results.values():
        speedup, versus = result.get("train_speedup_vs_eager"), result.get("inference_vs_attention_unet")
        train_ms, infer_s = result.get("train_step_ms"), result.get("inference_s_per_volume")
        label = result["label"] + (" [eager]" if "compile_error" in result else "")
        print(f"{label:<34} {'n/a' if train_ms is None else f'{train_ms:.1f}':>9} "
              f"{'n/a' if speedup is None else f'{speedup:.2f}x':>9} {format_bytes(result.get('train_peak_bytes')):>16} "
              f"{'n/a' if infer_s is None else f'{infer_s:.3f}':>12} {'n/a' if versus is None else f'{versus:.2f}':>15}")
        if "compile_error" in result:
            print(f"    torch.compile failed, so measured eager: {result['compile_error']}")
        if "error" in result:
            print(f"    failed: {result['error']}")
    print("x faster: eager fp32 step time / this step time.  infer/AttnUNet: inference time / AttentionUnet's.")
    if "error" in loader:
        print(f"Loader: failed: {loader['error']}")
    elif loader:
        print(f"Loader (--augment {loader['augment']}, {loader['cases']} volumes, {loader['workers']} workers): "
              f"{loader['samples_per_s']:.2f} samples/s; {loader['config']} step with the loader"
              + (" + device augmentation" if loader["augment"] == "device" else "")
              + f" {loader['step_with_loader_ms']:.1f} ms vs on-device tensors "
              f"{loader['step_on_device_ms']:.1f} ms: ratio {loader['loader_step_ratio']:.2f} "
              f"(target <= {TARGETS['loader_step_ratio']:.2f})")
        if report["device"] == "cpu":
            print("  (on the CPU the workers share the cores with the step, so the ratio overstates the GPU case)")
    validation = report.get("validation", {})
    if "error" in validation:
        print(f"Validation volume: failed: {validation['error']}")
    elif validation:
        print(f"Validation volume ({' x '.join(map(str, validation['size']))} source, "
              f"{' x '.join(map(str, validation['preprocessed_shape']))} preprocessed): per-epoch Dice on the "
              f"preprocessed grid {validation['preprocessed_grid_s']:.3f} s vs on the source grid "
              f"{validation['source_grid_s']:.3f} s (ratio {validation['source_over_preprocessed']:.2f}); final "
              f"HD95 of the foreground {validation['hd95_foreground_s']:.2f} s vs all six classes "
              f"{validation['hd95_all_classes_s']:.2f} s (ratio {validation['hd95_all_over_foreground']:.2f})")
    onnx = report.get("onnx", {})
    if "skipped" in onnx:
        print(f"ONNX Runtime: skipped ({onnx['skipped']})")
    elif "error" in onnx:
        print(f"ONNX Runtime: failed: {onnx['error']}")
    elif onnx:
        print(f"ONNX Runtime {onnx['onnxruntime']} vs PyTorch {report['torch']} (CPU, float32, ours at --channels, "
              f"window {tuple(report['roi'])}, {onnx['threads']} threads each): {onnx['onnxruntime_s_per_volume']:.3f} "
              f"vs {onnx['pytorch_s_per_volume']:.3f} s/volume: ratio {onnx['onnxruntime_vs_pytorch']:.2f} "
              f"(below 1: ONNX Runtime faster); largest probability difference "
              f"{onnx['max_probability_difference']:.1e}")
    if report["device"] == "cuda":
        print("Anchors on one H100 at 256x256x128 (train ms / GiB): "
              + ", ".join(f"{k} {ms} / {gib}" for k, (ms, gib) in ANCHORS_H100.items()))
    if report["targets"]:
        on_reference = report["device"] == "cpu" or ("H100" in report["device_name"]
                                                      and list(report["size"]) == [256, 256, 128])
        print("Targets" + ("" if on_reference else " (set for an H100 at 256x256x128: informative here)") + ":")
        for item in report["targets"]:
            sign = "<=" if item["at_most"] else ">="
            print(f"  {'PASS' if item['passed'] else 'FAIL'}  {item['target']}: {item['value']:.3f} {sign} {item['limit']}")
    if report["device"] == "cpu":
        print("MONAI's nets run in float32 on the CPU: compare them with the eager fp32 row "
              "(train.py uses bf16 on CPUs with native bf16).")
        print("CPU memory is the sampled peak resident-set growth of each configuration (model, Adam state, "
              "activations), not an allocator count.")


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("bench.py settings:")
    for key, value in vars(args).items():
        print(f"  {key:<10} {value}")
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.randn(1, 1, *args.size, generator=generator).to(device)
    label = torch.randint(0, NUM_CLASSES, (1, 1, *args.size), generator=generator).float().to(device)

    print("measuring the networks ...", flush=True)
    results = measure_configs(configurations(device, args.compile), image, label, args, device)
    add_ratios(results)

    # The loader must keep up with the fastest training step we have: the strictest test.
    candidates = fast_configs(results, device) or ["ours_eager_fp32"]
    fastest = min(candidates, key=lambda n: results.get(n, {}).get("train_step_ms", float("inf")))
    print(f"measuring the loader with {fastest} ...", flush=True)
    # Rebuilt from the result, so a configuration whose compile failed is rebuilt eager.
    loader_config = Config(**{field.name: results[fastest][field.name] for field in fields(Config)})
    try:
        loader = measure_loader(loader_config, args, device, image, label)
    except Exception as error:  # noqa: BLE001 - recorded in the report
        loader = {"config": fastest, "error": f"{type(error).__name__}: {error}"}
    finally:
        release_memory(device)

    print("measuring the cost of a validation volume ...", flush=True)
    try:
        validation = measure_validation(args)
    except Exception as error:  # noqa: BLE001 - recorded in the report
        validation = {"error": error_text(error)}

    print("measuring ONNX Runtime against PyTorch ...", flush=True)
    try:
        onnx = measure_onnx(args, device, image)
    except Exception as error:  # noqa: BLE001 - recorded in the report
        onnx = {"error": error_text(error)}
    finally:
        release_memory(device)

    report = {
        "device": device.type, "device_name": device_description(device), "torch": torch.__version__,
        "monai": monai.__version__, "python": platform.python_version(), "size": args.size, "roi": args.roi,
        "overlap": args.overlap, "warmup": args.warmup, "repeats": args.repeats, "settings": vars(args),
        "configs": results, "loader": loader, "validation": validation, "onnx": onnx, "targets": check_targets(results, loader, device),
        "anchors_h100_ms_gib": ANCHORS_H100, "target_limits": TARGETS,
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(report)
    out = Path(args.out)
    write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"Wrote {out} ({report['wall_s']} s)")
    return report


if __name__ == "__main__":
    main(get_args())
