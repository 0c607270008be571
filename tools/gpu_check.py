"""One command that proves the GPU path: run it the moment a CUDA GPU is at hand.

    python -m tools.gpu_check                   # on a CUDA machine: at most 8.5 minutes, one JSON file
    python -m tools.gpu_check --dry-run         # every step on the CPU at tiny sizes (the tests run this)

Seven steps, in this order; a failing step is recorded with its error and the next one runs:

  1 environment       card, memory, compute capability, driver, torch, CUDA, cuDNN, NCCL, native bf16
  2 fast_path         one training step of the fast path (bf16 or fp16 autocast, channels_last_3d,
                      regional torch.compile of model.blocks(), as train.py does) against exact
                      float32: relative error of the logits and of the gradients; the other
                      half-precision type eager with a GradScaler
  3 benchmark         bench.py at full size (1 x 1 x 256 x 256 x 128): step time, peak memory,
                      inference per volume, loader against the on-device step
  4 time_to_accuracy  train.py on the default phantom at its default settings: seconds until every
                      class reaches validation Dice 0.9, compile time, then predict.py's test Dice
  5 adaptation        adapt.py on a test patient of step 4's model, its first week as the reference
                      scan, at adapt.py's default setting: seconds (fine-tuning and the check on the
                      reference scan), and the reference scan's Dice before and after
  6 distributed       torchrun train.py for 2 epochs on every GPU (NCCL), the collectives alone,
                      single-process predict.py and train.py --resume from its checkpoint
  7 out_of_memory     a training run with a --patch-size no GPU can hold ends in train.py's
                      one-line message naming the memory flags, not a traceback

Each step gets a share of --minutes (a step's unused time passes on to the later ones); a step
that reaches its share is stopped cleanly and marked "cut short". Everything lands in --out: every
figure, each target with its limit and pass/fail, the commands run and where their logs are. A
markdown table of the same is printed at the end, ready for the README. Scratch output (runs,
predictions, logs) goes to a folder beside --out.

With --dry-run the same steps run on the CPU at tiny sizes (a 5-patient phantom at 48 x 48 x 24,
networks 4..32 wide, torchrun with two gloo processes, bench.py at 48 x 32 x 16): the targets are
reported but not judged, compile is left out (it takes minutes on a small CPU), and the
out-of-memory step is skipped, since a CPU has no GPU memory to run out of.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss

from modules import ImprovedUNet3D
from pelvicseg.atomic import write_text
from pelvicseg.inference import cpu_has_native_bf16
from pelvicseg.training import Trainer
from pelvicseg.phantom import make_case
from tools.bench import TARGETS as BENCH_TARGETS

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
NUM_CLASSES = 6
STEPS = ("environment", "fast_path", "benchmark", "time_to_accuracy", "adaptation", "distributed", "out_of_memory")
TITLES = {
    "environment": "environment",
    "fast_path": "fast path vs float32",
    "benchmark": "bench.py",
    "time_to_accuracy": "time to accuracy",
    "adaptation": "adapt.py on one patient",
    "distributed": "torchrun, predict, resume",
    "out_of_memory": "out of memory",
}
# Seconds of the default 8.5 minutes each step may use, scaled with --minutes. The first GPU spell
# will tell how close these guesses are; time a step leaves unused passes on to the later ones.
STEP_SECONDS = {"environment": 0, "fast_path": 60, "benchmark": 110, "time_to_accuracy": 170, "adaptation": 30,
                "distributed": 85, "out_of_memory": 55}
DEFAULT_MINUTES = 8.5
MIN_STEP_SECONDS = 10  # less than this left: the step is not started
STOP_GRACE_S = 15  # a stopped train.py finishes its current step and saves; then it is killed

# The targets, set for one H100-class GPU at the default settings.
BENCHMARK_TARGETS = ("train_step_ms", "train_peak_gib", "speedup_vs_eager", "loader_step_ratio",
                     "inference_s_per_volume")
TARGETS = {
    **{name: BENCH_TARGETS[name] for name in BENCHMARK_TARGETS},  # bench.py's own, judged here on a GPU
    "dice": 0.9,
    "seconds_to_dice": 180.0,
    "compile_s": 40.0,
    "adaptation_s": 60.0,
}
# Relative L2 error of one training step against exact float32 (TF32 off): a bf16 rounding is
# 2**-9 relative, and the errors of ~20 layers add up; the loss reduces whole volumes and the
# gradients sum over every voxel, so they carry more error than the logits. fp16 has 3 more
# mantissa bits and gets the same limits.
TOLERANCE = {"logits": 0.05, "gradients": 0.15, "argmax_agreement": 0.98}
# Bytes per voxel of a training step of the default network: the bench anchor on an H100 was
# 1.6 kB (12.5 GiB at 256 x 256 x 128), the target 1 kB. The out-of-memory step asks for twice
# the GPU's memory at the lower figure, so no GPU can hold it.
BYTES_PER_VOXEL_AT_LEAST = 1000
MEMORY_FLAGS_NAMED = ("--patch-size", "--channels", "--checkpointing")
DISTRIBUTED_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "TORCHELASTIC_RUN_ID")

# --dry-run sizes: seconds on 2 CPU cores. The first axis is 48, not 32: with PyTorch 2.13 on the
# CPU, a bf16 Conv3d's weight gradient is garbage (up to 1e37, inf or NaN) when the input's first
# spatial axis is 2, which 32 becomes at the bottleneck (48 becomes 3).
DRY_SIZE = (48, 32, 16)
DRY_CHANNELS = (4, 8, 16, 32)
DRY_TRAIN = ["--spatial-size", *map(str, DRY_SIZE), "--channels", *map(str, DRY_CHANNELS), "--workers", "0",
             "--device", "cpu"]
DRY_BENCH = ["--device", "cpu", "--size", *map(str, DRY_SIZE), "--warmup", "2", "--repeats", "1", "--cases", "2",
             "--workers", "0", "--channels", "8", "16", "32", "64"]


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check the GPU path in one command: the fast path's numerics, "
                                     "bench.py's speed and memory targets, time to accuracy, torchrun with NCCL, "
                                     "resume, and the out-of-memory message; one JSON report.")
    parser.add_argument("--out", default="runs/gpu_check/gpu_check.json",
                        help="JSON report; scratch runs and logs go to a folder beside it")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="time budget for all steps; a step reaching its share is stopped and marked cut short")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU at tiny sizes; targets are reported, not judged")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    return args


# ----------------------------------------------------------------------------- reports

@dataclass
class StepReport:
    """One step's outcome. status: passed (every check judged and met), failed (a check not met),
    ran (nothing failed, some targets not judged, as in --dry-run), cut short (the time budget
    ended it), skipped (cannot run here) or error (it broke: ``error`` says how)."""

    name: str
    status: str = "ran"
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str | None = None

    def target(self, name: str, value, limit: float, at_most: bool = True, judged: bool = True,
               unit: str = "") -> None:
        """A numeric target; value None means it was not measured (or not reached)."""
        if value is not None and not math.isfinite(value):
            value = None
        if not judged:
            passed, note = None, "not judged on CPU"
        elif value is None:
            passed, note = False, "not measured or not reached"
        else:
            passed, note = (value <= limit if at_most else value >= limit), ""
        self.checks.append({"check": name, "value": value, "target": f"{'<=' if at_most else '>='} {limit:g}{unit}",
                            "passed": passed, "note": note})

    def require(self, name: str, ok: bool, value=None) -> None:
        """A condition that must hold on every device, --dry-run included."""
        self.checks.append({"check": name, "value": value, "target": "required", "passed": bool(ok), "note": ""})

    def settle(self) -> None:
        if self.error is not None:
            self.status = "error"
        elif self.status in ("cut short", "skipped"):
            return
        elif any(c["passed"] is False for c in self.checks):
            self.status = "failed"
        elif self.checks and all(c["passed"] is True for c in self.checks):
            self.status = "passed"
        else:
            self.status = "ran"


def json_safe(figures):
    """Figures for a strict JSON file: NaN and infinities (a class absent from a volume, a broken
    gradient) become None."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return clean(figures)


# ----------------------------------------------------------------------------- time budget

class Budget:
    """--minutes split over the steps by STEP_SECONDS: a step may use what is left minus the shares
    of the steps after it, so time one step leaves unused passes on to the later ones."""

    def __init__(self, minutes: float):
        self.started = time.monotonic()
        self.deadline = self.started + 60.0 * minutes
        self.scale = minutes / DEFAULT_MINUTES

    def seconds_for(self, step: str) -> float:
        later = STEPS[STEPS.index(step) + 1:]
        reserved = sum(STEP_SECONDS[s] for s in later) * self.scale
        return max(0.0, self.deadline - time.monotonic() - reserved)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


# ----------------------------------------------------------------------------- subprocesses

@dataclass
class Finished:
    command: list
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    lines: list  # (seconds since start, stdout line)
    stopped: str | None  # None, "budget" (time ran out) or "asked" (the watcher had what it needed)


def child_environment() -> dict:
    """This environment without torchrun's variables (a check started under torchrun must not
    make train.py join that job), with unbuffered output so lines arrive as they are printed."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the command alone: train.py then finishes its current step, saves and shuts its
    loader workers down (a SIGTERM of its own would kill them mid-epoch and turn the clean stop
    into an error); torchrun passes it on to its ranks. Whatever of the process group is still
    there after the grace time is killed."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_command(command: Sequence[str], log_path: Path, limit_s: float,
                watch: Callable[[list], bool] | None = None) -> Finished:
    """Run ``command`` in the repository, streaming stdout (timestamped) and stderr into
    ``log_path``; stop it when ``limit_s`` is reached or when ``watch(lines)`` returns True."""
    command = [str(part) for part in command]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lines, stderr_parts = [], []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=child_environment(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)

        def read(stream, sink, stamped):
            for line in stream:
                if stamped:
                    sink.append((time.monotonic() - started, line.rstrip("\n")))
                else:
                    sink.append(line)
                log.write(line)
                log.flush()

        readers = [threading.Thread(target=read, args=(process.stdout, lines, True), daemon=True),
                   threading.Thread(target=read, args=(process.stderr, stderr_parts, False), daemon=True)]
        for reader in readers:
            reader.start()
        stopped = None
        while process.poll() is None:
            if time.monotonic() - started > limit_s:
                stopped = "budget"
            elif watch is not None and watch(lines):
                stopped = "asked"
            if stopped:
                end_process_group(process)
                break
            time.sleep(0.25)
        process.wait()
        for reader in readers:
            reader.join(timeout=10)
    return Finished(command, process.returncode, round(time.monotonic() - started, 1),
                    "\n".join(line for _, line in lines), "".join(stderr_parts), lines, stopped)


def record_command(step: StepReport, finished: Finished, log_path: Path) -> None:
    step.commands.append({"command": " ".join(finished.command), "returncode": finished.returncode,
                          "seconds": finished.seconds, "stopped": finished.stopped, "log": str(log_path)})
    if finished.stopped == "budget":
        step.status = "cut short"
        script = next((Path(part).name for part in finished.command if part.endswith(".py")), finished.command[0])
        step.notes.append(f"{script} stopped after {finished.seconds:.0f} s: the step's share of --minutes ran out")


def failure_text(finished: Finished) -> str:
    """The last lines of stderr (or stdout): what a reader of the JSON needs to see first."""
    text = (finished.stderr.strip() or finished.stdout.strip()).splitlines()
    return f"exit {finished.returncode}: " + " | ".join(text[-6:])[-1500:]


def python_script(script: str, *flags) -> list:
    """A command at the root (``train.py``) or a tool (``tools/bench.py``, run as ``-m tools.bench``)."""
    if script.startswith("tools/"):
        return [sys.executable, "-m", script[:-3].replace("/", "."), *flags]
    return [sys.executable, script, *flags]


@dataclass
class ChildOutcome:
    result: object
    error: str | None
    seconds: float
    cut_short: bool


def run_in_child(function: Callable, limit_s: float, *arguments) -> ChildOutcome:
    """``function(*arguments)`` in a fresh spawned process: a crash in CUDA, Triton or a compiler
    (segfault, illegal memory access) ends that process, not this report, and a hang ends at
    ``limit_s``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child_main, args=(results, function, arguments), daemon=True)
    started = time.monotonic()
    process.start()
    outcome, cut_short = None, False
    while outcome is None:
        try:
            outcome = results.get(timeout=1.0)
        except queue.Empty:
            if not process.is_alive():
                try:  # it may have put its result just before exiting
                    outcome = results.get(timeout=1.0)
                except queue.Empty:
                    break
            elif time.monotonic() - started > limit_s:
                cut_short = True
                process.kill()
                break
    process.join(timeout=30)
    seconds = round(time.monotonic() - started, 1)
    if outcome is not None:
        return ChildOutcome(outcome[0], outcome[1], seconds, False)
    if cut_short:
        return ChildOutcome(None, None, seconds, True)
    return ChildOutcome(None, f"the child process died (exit code {process.exitcode})", seconds, False)


def _child_main(results, function, arguments) -> None:
    try:
        results.put((function(*arguments), None))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the report
        results.put((None, f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"))


# ----------------------------------------------------------------------------- step 1: environment

def check_environment(run: argparse.Namespace, step: StepReport) -> None:
    figures = step.figures
    figures.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                   cpu=cpu_name(), cpu_cores=os.cpu_count(), gpu_count=torch.cuda.device_count())
    if not run.cuda:
        figures["cpu_bf16_native"] = cpu_bf16_native()
        step.notes.append("no GPU: the CPU is described instead")
        return
    properties = torch.cuda.get_device_properties(0)
    figures.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / GIB, 2),
                   compute_capability=f"{properties.major}.{properties.minor}",
                   multiprocessors=properties.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                   bf16_with_emulation=torch.cuda.is_bf16_supported(including_emulation=True))
    try:
        version = torch.cuda.nccl.version()
        figures["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except (AttributeError, RuntimeError):  # builds without NCCL
        figures["nccl"] = None
    figures["driver"] = nvidia_driver()
    figures["gpus"] = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    step.require("PyTorch sees a CUDA GPU", True, properties.name)
    if not figures["bf16_native"]:
        step.notes.append("no native bf16: train.py autocasts in fp16 with a GradScaler on this GPU")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_bf16_native() -> bool:
    """The one answer train.py and predict.py use (``inference.cpu_has_native_bf16``, from the CPU's
    flags): oneDNN's own check says yes on CPUs that only emulate bf16."""
    return cpu_has_native_bf16()


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return output.splitlines()[0] if output else None


# ----------------------------------------------------------------------------- step 2: fast path

def phantom_volume(size: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A phantom scan as training sees it: intensities scaled between the 0.5th and 99.5th
    percentiles to [0, 1], labels as float, both (1, 1, X, Y, Z). Real anatomy rather than noise:
    with random labels the gradients are mostly cancelling noise and say little about precision."""
    image, label, _ = make_case(4, 0, shape=tuple(size))
    low, high = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    return tuple(torch.as_tensor(array, dtype=torch.float32)[None, None].to(device) for array in (image, label))


class ExactFloat32:
    """The reference runs in true float32: cuDNN and cuBLAS otherwise use TF32 (10-bit mantissa)."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False


@dataclass
class StepOutput:
    logits: torch.Tensor
    gradients: dict  # parameter name -> float32 gradient on the CPU
    loss: float
    skipped_steps: int  # GradScaler steps skipped for inf/NaN gradients before a clean one


def training_step(model, image, label, loss_fn, amp_dtype, channels_last: bool, max_tries: int = 8) -> StepOutput:
    """train.py's step itself, ``Trainer.step``: autocast forward, float32 loss, backward through
    the GradScaler (enabled for fp16 only), gradient clipping, optimizer step. The optimizer has
    learning rate 0, so the weights stay those of the reference; the gradients compared are those
    the step left (unscaled, clipped as training clips them). A GradScaler step skipped for
    overflowing gradients is retried at the lowered scale, as training goes on to the next step."""
    scaler = torch.amp.GradScaler(image.device.type, enabled=amp_dtype == torch.float16)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), scaler, loss_fn, "combined", amp_dtype)
    x = image.contiguous(memory_format=torch.channels_last_3d) if channels_last else image
    for attempt in range(max_tries):
        result = trainer.step(x, label)
        gradients = {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters()
                     if p.grad is not None}
        clean = all(bool(torch.isfinite(g).all()) for g in gradients.values())
        if clean or not scaler.is_enabled():
            break
    return StepOutput(result.logits.float().cpu(), gradients, result.loss, attempt)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def compare_steps(fast: StepOutput, reference: StepOutput) -> dict:
    """Errors of one step against the reference. The gradients are compared as one vector (and per
    top-level block, whose worst is named): single tensors such as a conv bias before GroupNorm
    have near-zero gradients, whose relative error means nothing."""
    names = sorted(reference.gradients)
    missing = [n for n in names if n not in fast.gradients]
    if missing:
        raise RuntimeError(f"no gradient for {len(missing)} parameter(s), e.g. {missing[0]}")
    fast_flat, reference_flat = (torch.cat([grads[n].reshape(-1) for n in names])
                                 for grads in (fast.gradients, reference.gradients))
    per_block = {}
    for block in sorted({n.split(".")[0] for n in names}):
        members = [n for n in names if n.split(".")[0] == block]
        per_block[block] = relative_error(torch.cat([fast.gradients[n].reshape(-1) for n in members]),
                                          torch.cat([reference.gradients[n].reshape(-1) for n in members]))
    worst = max(per_block, key=per_block.get)
    return {
        "finite": bool(torch.isfinite(fast.logits).all()) and bool(torch.isfinite(fast_flat).all()),
        "logits_rel_error": relative_error(fast.logits, reference.logits),
        "grad_rel_error": relative_error(fast_flat, reference_flat),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(fast_flat.double(), reference_flat.double(),
                                                                   dim=0)),
        "argmax_agreement": float((fast.logits.argmax(1) == reference.logits.argmax(1)).float().mean()),
        "loss_difference": abs(fast.loss - reference.loss),
        "worst_block": worst,
        "worst_block_grad_rel_error": per_block[worst],
        "gradscaler_skipped_steps": fast.skipped_steps,
    }


def compare_fast_path(device_type: str, size: Sequence[int], channels: Sequence[int], variants: Sequence[dict]) -> dict:
    """Runs in a child process. One reference step in exact float32, then each variant (dtype,
    channels_last, compile) from the same weights on the same phantom volume."""
    device = torch.device(device_type)
    image, label = phantom_volume(size, device)
    torch.manual_seed(0)
    reference_model = ImprovedUNet3D(in_channels=1, out_channels=NUM_CLASSES, channels=list(channels)).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    initial = copy.deepcopy(reference_model.state_dict())
    with ExactFloat32():
        reference = training_step(reference_model, image, label, loss_fn, None, channels_last=False)
    results = {}
    for variant in variants:
        model = ImprovedUNet3D(in_channels=1, out_channels=NUM_CLASSES, channels=list(channels)).to(device)
        model.load_state_dict(initial)
        if variant["channels_last"]:
            model = model.to(memory_format=torch.channels_last_3d)
        if variant["compile"]:
            for block in model.blocks():
                block.compile()  # regional, as train.py does
        dtype = getattr(torch, variant["dtype"])
        started = time.perf_counter()
        fast = training_step(model, image, label, loss_fn, dtype, variant["channels_last"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        training_step(model, image, label, loss_fn, dtype, variant["channels_last"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        second_s = time.perf_counter() - started
        results[variant["name"]] = {**compare_steps(fast, reference), "first_step_s": first_s,
                                    "second_step_s": second_s}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def fast_path_variants(run: argparse.Namespace) -> list[dict]:
    """train.py's fast path on this device, and the other half-precision type eager. On CUDA:
    bf16 where the GPU has it natively, else fp16 (train.py's rule), with channels_last_3d and
    regional compile. On the CPU (--dry-run) compile takes minutes and train.py keeps the
    default memory format, so both run eager in it."""
    if run.cuda:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        main_dtype, other_dtype = ("bfloat16", "float16") if native else ("float16", "bfloat16")
    else:
        main_dtype, other_dtype = "bfloat16", "float16"
    short = {"bfloat16": "bf16", "float16": "fp16"}
    extras = "+channels_last_3d+compile" if run.cuda else ""
    return [
        {"name": f"{short[main_dtype]}{extras}", "dtype": main_dtype, "channels_last": run.cuda, "compile": run.cuda},
        {"name": f"{short[other_dtype]}{'+channels_last_3d' if run.cuda else ''}"
                 + ("+GradScaler" if other_dtype == "float16" else ""),
         "dtype": other_dtype, "channels_last": run.cuda, "compile": False},
    ]


def check_fast_path(run: argparse.Namespace, step: StepReport) -> None:
    size, channels = ((128, 128, 64), (32, 64, 128, 256)) if run.cuda else (DRY_SIZE, DRY_CHANNELS)
    variants = fast_path_variants(run)
    step.figures.update(size=list(size), channels=list(channels))
    if not run.cuda:
        step.notes.append("CPU: eager, default memory format (compile takes minutes on a small CPU; train.py "
                          "uses channels_last_3d on CUDA only)")
    outcome = run_in_child(compare_fast_path, run.budget.seconds_for("fast_path"), run.device_type, size, channels,
                           variants)
    if outcome.cut_short:
        step.status = "cut short"
        step.notes.append(f"stopped after {outcome.seconds:.0f} s: the step's share of --minutes ran out")
        return
    if outcome.error is not None:
        step.error = outcome.error
        return
    results = outcome.result
    for name, result in results.items():
        for key, value in result.items():
            step.figures[f"{name}: {key}"] = value
        step.require(f"{name}: logits and gradients finite", result["finite"])
        step.require(f"{name}: logits relative error <= {TOLERANCE['logits']}",
                     result["logits_rel_error"] <= TOLERANCE["logits"], round(result["logits_rel_error"], 5))
        step.require(f"{name}: gradient relative error <= {TOLERANCE['gradients']}",
                     result["grad_rel_error"] <= TOLERANCE["gradients"], round(result["grad_rel_error"], 5))
        step.require(f"{name}: same arg-max class on >= {TOLERANCE['argmax_agreement']:.0%} of voxels",
                     result["argmax_agreement"] >= TOLERANCE["argmax_agreement"], round(result["argmax_agreement"], 5))
    compiled = [v["name"] for v in variants if v["compile"]]
    if compiled:
        result = results[compiled[0]]
        step.figures["compile_s"] = result["first_step_s"] - result["second_step_s"]
        step.figures["fast_step_ms"] = 1000 * result["second_step_s"]


# ----------------------------------------------------------------------------- step 3: bench.py

def run_benchmark(run: argparse.Namespace, step: StepReport) -> None:
    out = run.work / "bench.json"
    log = run.work / "logs" / "bench.log"
    # Ten timed steps, not bench.py's fifteen: the same medians, within the step's share of time.
    flags = ["--device", "cuda", "--repeats", "10"] if run.cuda else DRY_BENCH
    finished = run_command(python_script("tools/bench.py", *flags, "--out", out), log, run.budget.seconds_for("benchmark"))
    record_command(step, finished, log)
    if finished.stopped:
        return
    if finished.returncode != 0 or not out.is_file():
        step.error = failure_text(finished)
        return
    report = json.loads(out.read_text())
    configs, loader = report.get("configs", {}), report.get("loader", {})
    step.figures.update(device=report.get("device_name"), size=report.get("size"), repeats=report.get("repeats"))
    for name, result in configs.items():
        prefix = f"{name}: "
        for key in ("train_step_ms", "train_speedup_vs_eager", "inference_s_per_volume", "inference_vs_attention_unet",
                    "warmup_s"):
            if result.get(key) is not None:
                step.figures[prefix + key] = result[key]
        if result.get("train_peak_bytes") is not None:
            step.figures[prefix + "train_peak_gib"] = result["train_peak_bytes"] / GIB
        step.require(f"{name}: measured without error", "error" not in result, result.get("error"))
        if result.get("compile"):
            step.require(f"{name}: compiled (no eager fallback)", "compile_error" not in result,
                         result.get("compile_error"))
    for key in ("samples_per_s", "step_on_device_ms", "step_with_loader_ms", "loader_step_ratio"):
        if loader.get(key) is not None:
            step.figures[f"loader: {key}"] = loader[key]
    step.require("loader measured without error", "error" not in loader, loader.get("error"))

    fast = "ours_fast" if run.cuda else ("ours_bf16" if "ours_bf16" in configs else "ours_eager_fp32")
    result = configs.get(fast, {})
    peak = result.get("train_peak_bytes")
    judged = run.cuda
    step.target(f"{fast}: full-volume training step", result.get("train_step_ms"), TARGETS["train_step_ms"],
                judged=judged, unit=" ms")
    step.target(f"{fast}: peak memory of a training step", None if peak is None else peak / GIB,
                TARGETS["train_peak_gib"], judged=judged, unit=" GiB")
    step.target(f"{fast}: speed-up over eager float32", result.get("train_speedup_vs_eager"),
                TARGETS["speedup_vs_eager"], at_most=False, judged=judged, unit="x")
    step.target("step fed by the loader / step on device tensors", loader.get("loader_step_ratio"),
                TARGETS["loader_step_ratio"], judged=judged)
    step.target(f"{fast}: inference per volume", result.get("inference_s_per_volume"),
                TARGETS["inference_s_per_volume"], judged=judged, unit=" s")
    if run.cuda and not re.search(r"H100|H200|H800|GH200|B200", str(report.get("device_name"))):
        step.notes.append("the targets are set for an H100-class card; on this card they are a reference only")


# ----------------------------------------------------------------------------- data for the steps

def tiny_phantom(run: argparse.Namespace, step: StepReport, name: str, patients: int) -> Path | None:
    """A small phantom written by phantom.py into the scratch folder (once per name)."""
    folder = run.work / name
    if (folder / "phantom_done").is_file():
        return folder
    log = run.work / "logs" / f"{name}.log"
    finished = run_command(python_script("phantom.py", "--out", folder, "--patients", str(patients), "--weeks", "1",
                                         "--shape", "48", "48", "24"), log, limit_s=120)
    record_command(step, finished, log)
    if finished.returncode != 0:
        step.error = "phantom.py: " + failure_text(finished)
        return None
    (folder / "phantom_done").write_text("")
    return folder


def data_flags(run: argparse.Namespace, step: StepReport) -> list | None:
    """train.py's data flags: on CUDA none (its default phantom, generated once into data/phantom/),
    in --dry-run the tiny phantom plus tiny sizes."""
    if run.cuda:
        return []
    folder = tiny_phantom(run, step, "phantom_dry_run", patients=5)
    return None if folder is None else ["--data-root", folder, *DRY_TRAIN]


def data_root_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("data_root")
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def validation_dice(row: dict) -> dict:
    """{class: validation Dice} from one metrics.csv row (columns dice_<class>, not train_dice_<class>)."""
    dice = {}
    for key, value in row.items():
        if key.startswith("dice_"):
            try:
                dice[key[len("dice_"):]] = float(value)
            except (TypeError, ValueError):
                dice[key[len("dice_"):]] = math.nan
    return dice


def run_predict(run: argparse.Namespace, step: StepReport, checkpoint: Path, data_root: str | None, name: str,
                limit_s: float) -> dict | None:
    """predict.py on the test patients of the checkpoint's split; returns summary.json's per-class Dice."""
    out = run.work / name
    flags = ["--checkpoint", checkpoint, "--split", "test", "--out", out, "--no-figures", "--no-hd95"]
    if data_root:
        flags += ["--data-root", data_root]
    else:
        flags += ["--data-root", "data/phantom"]
    if not run.cuda:
        flags += ["--device", "cpu"]
    log = run.work / "logs" / f"{name}.log"
    finished = run_command(python_script("predict.py", *flags), log, limit_s)
    record_command(step, finished, log)
    summary_path = out / "summary.json"
    step.require(f"{name}: predict.py exit 0 and summary.json written",
                 finished.returncode == 0 and summary_path.is_file(), finished.returncode)
    if finished.returncode != 0 or not summary_path.is_file():
        step.notes.append(f"{name}: " + failure_text(finished))
        return None
    return json.loads(summary_path.read_text()).get("per_class_dice")


# ----------------------------------------------------------------------------- step 4: time to accuracy

class AccuracyWatch:
    """Reads train.py's output as it streams: the time each epoch line appears and, from
    metrics.csv, the first epoch at which every class has validation Dice >= the target.

    With ``stop_when_decided`` it asks to stop training once the target is decided: reached, or
    its time limit passed (after any phantom generation). Further epochs would only take time
    from the later steps."""

    def __init__(self, run_dir: Path, stop_when_decided: bool):
        self.metrics = run_dir / "metrics.csv"
        self.stop_when_decided = stop_when_decided
        self.started = time.monotonic()
        self.epoch_seconds: dict[int, float] = {}
        self.reached: tuple[int, float] | None = None  # (epoch, seconds since train.py's start)
        self.gave_up = False
        self.seen = 0

    def __call__(self, lines: list) -> bool:
        new = lines[self.seen:]
        self.seen += len(new)
        for seconds, line in new:
            match = re.match(r"\s*epoch\s+(\d+)/", line)
            if match:
                self.epoch_seconds[int(match.group(1))] = seconds
        if self.reached is None and new and self.epoch_seconds:
            for row in read_metrics(self.metrics):
                epoch = int(row["epoch"])
                dice = validation_dice(row)
                if dice and all(d >= TARGETS["dice"] for d in dice.values()) and epoch in self.epoch_seconds:
                    self.reached = (epoch, self.epoch_seconds[epoch])
                    break
        if not self.stop_when_decided:
            return False
        training_s = time.monotonic() - self.started - phantom_generation_seconds(lines)
        self.gave_up = self.reached is None and training_s > TARGETS["seconds_to_dice"] + STOP_GRACE_S
        return self.reached is not None or self.gave_up


def phantom_generation_seconds(lines: list) -> float:
    """Seconds train.py spent generating the default phantom: from its 'Generating' line to the
    next (until that line comes, the generation is still going on: all the time since)."""
    for index, (seconds, line) in enumerate(lines):
        if line.startswith("Generating the default phantom"):
            return lines[index + 1][0] - seconds if index + 1 < len(lines) else math.inf
    return 0.0


def printed_setting(lines: list, name: str) -> str | None:
    """A value from train.py's settings banner, e.g. 'precision'."""
    for _, line in lines:
        match = re.match(rf"\s+{name}\s+(.+)$", line)
        if match:
            return match.group(1).strip()
    return None


def check_time_to_accuracy(run: argparse.Namespace, step: StepReport) -> None:
    flags = data_flags(run, step)
    if flags is None:
        return
    run_dir = run.work / "accuracy"
    epochs = [] if run.cuda else ["--epochs", "2"]
    predict_reserve = 45
    watch = AccuracyWatch(run_dir, stop_when_decided=run.cuda)
    log = run.work / "logs" / "accuracy_train.log"
    limit = run.budget.seconds_for("time_to_accuracy") - predict_reserve - STOP_GRACE_S
    finished = run_command(python_script("train.py", "--out", run_dir, *epochs, *flags), log, limit, watch)
    record_command(step, finished, log)
    watch(finished.lines)  # the lines that arrived after the last look
    rows = read_metrics(run_dir / "metrics.csv")
    clean_exit = finished.returncode == 0 and finished.stopped != "budget"
    step.require("train.py exit 0", finished.returncode == 0 or finished.stopped == "asked", finished.returncode)
    if not clean_exit and not rows:
        step.error = failure_text(finished)
        return

    generation_s = phantom_generation_seconds(finished.lines)
    seconds_per_epoch = [float(r["seconds"]) for r in rows if r.get("seconds")]
    step.figures.update(epochs_completed=len(rows), phantom_generation_s=generation_s,
                        precision=printed_setting(finished.lines, "precision"))
    if seconds_per_epoch:
        step.figures["first_epoch_s"] = seconds_per_epoch[0]
    if len(seconds_per_epoch) >= 2:
        step.figures["later_epoch_median_s"] = statistics.median(seconds_per_epoch[1:])
        # What the first epoch costs beyond a later one: on CUDA, where train.py compiles by
        # default, that is the compilation (and first-call warm-up).
        step.figures["first_epoch_extra_s"] = seconds_per_epoch[0] - step.figures["later_epoch_median_s"]
    best = {}
    for row in rows:
        for name, dice in validation_dice(row).items():
            if math.isfinite(dice):
                best[name] = max(best.get(name, -1.0), dice)
    step.figures["best_validation_dice"] = best
    reached_s = None
    if watch.reached is not None:
        step.figures["target_epoch"] = watch.reached[0]
        step.figures["seconds_to_target"] = watch.reached[1]
        reached_s = watch.reached[1] - generation_s
        step.figures["seconds_to_target_without_phantom_generation"] = reached_s
    if finished.stopped == "asked" and watch.reached is not None:
        step.notes.append(f"training stopped at epoch {watch.reached[0]}, where every class reached the target")
    elif finished.stopped == "asked":
        step.notes.append(f"training stopped {TARGETS['seconds_to_dice']:g} s after its start without every class "
                          "reaching the target")
    judged = run.cuda
    step.target(f"seconds from train.py's start until every class has validation Dice >= {TARGETS['dice']} "
                "(one-time phantom generation left out)", reached_s, TARGETS["seconds_to_dice"], judged=judged,
                unit=" s")
    step.target("compile time: the first epoch's extra seconds over a later one",
                step.figures.get("first_epoch_extra_s") if run.cuda else None, TARGETS["compile_s"], judged=judged,
                unit=" s")

    best_path = run_dir / "best.pt"
    step.require("best.pt written", best_path.is_file())
    if best_path.is_file():
        limit = max(run.budget.seconds_for("time_to_accuracy"), MIN_STEP_SECONDS)
        test_dice = run_predict(run, step, best_path, data_root_of(run_dir), "accuracy_predict", limit)
        if test_dice:
            step.figures["test_dice"] = test_dice


# ----------------------------------------------------------------------------- step 5: adaptation

def check_adaptation(run: argparse.Namespace, step: StepReport) -> None:
    """adapt.py on the first test patient of step 4's run, at its default setting."""
    parent = run.work / "accuracy"
    if not (parent / "best.pt").is_file():
        step.error = "no best.pt from the time-to-accuracy step to adapt"
        return
    patient = json.loads((parent / "splits.json").read_text())["test"][0]
    out = run.work / "adapted"
    flags = ["--checkpoint", parent, "--patient", patient, "--out", out]
    if not run.cuda:
        flags += ["--device", "cpu"]
    log = run.work / "logs" / "adapt.log"
    finished = run_command(python_script("adapt.py", *flags), log, max(run.budget.seconds_for("adaptation"),
                                                                        MIN_STEP_SECONDS))
    record_command(step, finished, log)
    record_path = out / "adapted.json"
    step.require("adapt.py exit 0 and adapted.json written", finished.returncode == 0 and record_path.is_file(),
                 finished.returncode)
    if finished.returncode != 0 or not record_path.is_file():
        step.error = failure_text(finished)
        return
    record = json.loads(record_path.read_text())
    step.figures.update(patient=patient, settings=record["settings"], train_seconds=record["train_seconds"],
                        seconds=record["seconds"], reference_dice_parent=record["reference_mean_fg_dice_parent"],
                        reference_dice_adapted=record["reference_mean_fg_dice_adapted"], used=record["used"])
    step.target("one adaptation: fine-tuning and the check on the reference scan", record["seconds"],
                TARGETS["adaptation_s"], judged=run.cuda, unit=" s")


# ----------------------------------------------------------------------------- step 6: distributed

def check_collectives(backend: str, device_type: str, store: str) -> dict:
    """Runs in a child process: all_reduce, all_gather_object and barrier with one process, which is
    what the collectives of a one-GPU torchrun run amount to."""
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        values = torch.arange(4, dtype=torch.float64, device=device)
        dist.all_reduce(values)
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0})
        dist.barrier()
        return {"all_reduce_ok": values.cpu().tolist() == [0.0, 1.0, 2.0, 3.0], "gather_ok": gathered == [{"rank": 0}]}
    finally:
        dist.destroy_process_group()


def check_distributed(run: argparse.Namespace, step: StepReport) -> None:
    flags = data_flags(run, step)
    if flags is None:
        return
    backend = "nccl" if run.cuda else "gloo"
    processes = torch.cuda.device_count() if run.cuda else 2
    step.figures.update(backend=backend, processes=processes)

    store = run.work / "collectives_store"
    outcome = run_in_child(check_collectives, 60, backend, run.device_type, str(store))
    step.require(f"{backend}: all_reduce, all_gather_object and barrier (one process)",
                 outcome.error is None and not outcome.cut_short and all(outcome.result.values()),
                 outcome.error.splitlines()[0] if outcome.error else None)

    run_dir = run.work / "distributed"
    log = run.work / "logs" / "distributed_torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "train.py", "--out", run_dir, "--epochs", "2", *flags]
    finished = run_command(command, log, run.budget.seconds_for("distributed") - STOP_GRACE_S)
    record_command(step, finished, log)
    if finished.stopped:
        return
    rows = read_metrics(run_dir / "metrics.csv")
    step.require("torchrun train.py exit 0", finished.returncode == 0, finished.returncode)
    step.require("metrics.csv has one row per epoch (2)", len(rows) == 2, len(rows))
    replica_line = f"DDP check: weights identical on {processes} ranks"
    if processes > 1:
        step.require(f"'{replica_line}' printed", replica_line in finished.stdout)
    elif replica_line not in finished.stdout:
        step.notes.append("one GPU: train.py trained without a process group, so NCCL ran only in the "
                          "collectives check")
    if finished.returncode != 0:
        step.notes.append("torchrun: " + failure_text(finished))
        return

    last = run_dir / "last.pt"
    test_dice = run_predict(run, step, run_dir / "best.pt", data_root_of(run_dir), "distributed_predict",
                            max(run.budget.seconds_for("distributed") - STOP_GRACE_S, MIN_STEP_SECONDS))
    if test_dice:
        step.figures["test_dice"] = test_dice
    if step.status == "cut short":
        return

    resume_flags = ["--out", run_dir, "--resume", "--epochs", "3"]
    if not run.cuda:
        resume_flags += ["--data-root", data_root_of(run_dir), "--workers", "0", "--device", "cpu"]
    log = run.work / "logs" / "distributed_resume.log"
    step.require("last.pt written by the torchrun run", last.is_file())
    finished = run_command(python_script("train.py", *resume_flags), log,
                           max(run.budget.seconds_for("distributed") - STOP_GRACE_S, MIN_STEP_SECONDS))
    record_command(step, finished, log)
    if finished.stopped:
        return
    rows = read_metrics(run_dir / "metrics.csv")
    step.require("train.py --resume exit 0", finished.returncode == 0, finished.returncode)
    step.require("resumed after epoch 2", "after epoch 2" in finished.stdout)
    step.require("metrics.csv holds epochs 1, 2, 3", [r.get("epoch") for r in rows] == ["1", "2", "3"],
                 [r.get("epoch") for r in rows])
    if finished.returncode != 0:
        step.notes.append("resume: " + failure_text(finished))


# ----------------------------------------------------------------------------- step 7: out of memory

def impossible_size(gpu_bytes: int) -> list[int]:
    """A (2a, 2a, a) volume, a a multiple of 16, needing about twice ``gpu_bytes`` to train at the
    lowest bytes per voxel the default network has been seen to use."""
    voxels = 2 * gpu_bytes / BYTES_PER_VOXEL_AT_LEAST
    side = math.ceil((voxels / 4) ** (1 / 3) / 16) * 16
    return [2 * side, 2 * side, side]


def check_out_of_memory(run: argparse.Namespace, step: StepReport) -> None:
    if not run.cuda:
        step.status = "skipped"
        step.notes.append("no GPU: a CPU run cannot run out of GPU memory, so there is nothing to check")
        return
    folder = tiny_phantom(run, step, "phantom_out_of_memory", patients=3)
    if folder is None:
        return
    size = impossible_size(torch.cuda.get_device_properties(0).total_memory)
    step.figures.update(patch_size=size, voxels=int(np.prod(size)),
                        estimated_need_gib=int(np.prod(size)) * BYTES_PER_VOXEL_AT_LEAST / GIB)
    as_text = [str(s) for s in size]
    log = run.work / "logs" / "out_of_memory.log"
    finished = run_command(python_script("train.py", "--data-root", folder, "--out", run.work / "out_of_memory",
                                         "--epochs", "1", "--spatial-size", *as_text, "--patch-size", *as_text,
                                         "--workers", "0"),
                           log, run.budget.seconds_for("out_of_memory") - STOP_GRACE_S)
    record_command(step, finished, log)
    if finished.stopped:
        return
    lines = [line for line in finished.stderr.strip().splitlines() if line.strip()]
    message = next((line for line in lines if "out of GPU memory" in line), "")
    step.figures["message"] = message or (lines[-1] if lines else "")
    step.require("exit code is not 0", finished.returncode not in (0, None), finished.returncode)
    step.require("no traceback on stderr", "Traceback" not in finished.stderr)
    step.require("one line saying 'out of GPU memory'", bool(message))
    for flag in MEMORY_FLAGS_NAMED:
        step.require(f"the message names {flag}", flag in message)


# ----------------------------------------------------------------------------- report

def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(report: dict) -> str:
    """One row per check (steps without checks: one row with their status), for the README."""
    header = ["| step | check | measured | target | result |", "| --- | --- | --- | --- | --- |"]
    rows = []
    for name in STEPS:
        step = report["steps"][name]
        first_row = len(rows)
        title = f"{TITLES[name]} ({step['status']}, {step['seconds']:.0f} s)"
        if name == "environment":
            figures = step["figures"]
            if figures.get("gpu"):
                detail = (f"{figures['gpu']}, {figures['gpu_memory_gib']} GiB, torch {figures['torch']}, CUDA "
                          f"{figures['cuda']}, bf16 native {format_value(figures['bf16_native'])}")
            else:
                detail = f"{figures['cpu']}, {figures['cpu_cores']} cores, torch {figures['torch']}"
            rows.append(f"| {title} | device | {detail} | | |")
        for check in step["checks"]:
            result = {True: "pass", False: "**FAIL**", None: check["note"] or "not measured"}[check["passed"]]
            rows.append(f"| {title} | {check['check']} | {format_value(check['value'])} | {check['target']} "
                        f"| {result} |")
        if not step["checks"] and name != "environment":
            why = step["error"] or "; ".join(step["notes"]) or ""
            rows.append(f"| {title} | - | - | - | {why.splitlines()[0] if why else step['status']} |")
        # The step's name on its first row only: the table reads as one block per step.
        for index in range(first_row + 1, len(rows)):
            rows[index] = rows[index].replace(f"| {title} |", "| |", 1)
    return "\n".join(header + rows)


def write_report(report: dict, path: Path) -> None:
    write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- main

STEP_FUNCTIONS = {
    "environment": check_environment,
    "fast_path": check_fast_path,
    "benchmark": run_benchmark,
    "time_to_accuracy": check_time_to_accuracy,
    "adaptation": check_adaptation,
    "distributed": check_distributed,
    "out_of_memory": check_out_of_memory,
}


def run_step(name: str, run: argparse.Namespace) -> StepReport:
    step = StepReport(name)
    started = time.monotonic()
    if name != "environment" and run.budget.seconds_for(name) < MIN_STEP_SECONDS:
        step.status = "cut short"
        step.notes.append(f"not started: less than {MIN_STEP_SECONDS} s of --minutes {run.minutes:g} left for it")
        return step
    try:
        STEP_FUNCTIONS[name](run, step)
    except Exception as error:  # noqa: BLE001 - one step's failure is recorded; the next step runs
        step.error = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
    step.seconds = round(time.monotonic() - started, 1)
    step.figures, step.checks = json_safe(step.figures), json_safe(step.checks)
    step.settle()
    return step


def main(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("error: PyTorch sees no CUDA GPU; --dry-run runs every step on the CPU at tiny sizes")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{out.stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-", dir=out.parent))
    run = argparse.Namespace(cuda=cuda, device_type="cuda" if cuda else "cpu", dry_run=args.dry_run,
                             minutes=args.minutes, budget=Budget(args.minutes), work=work.resolve())
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "dry_run": args.dry_run,
              "device": run.device_type, "minutes": args.minutes,
              "started": datetime.now().isoformat(timespec="seconds"), "work_dir": str(work), "targets": TARGETS,
              "tolerance": TOLERANCE, "steps": {}}
    print(f"gpu_check.py: {'dry run on the CPU' if args.dry_run else 'CUDA'}, budget {args.minutes:g} min, "
          f"scratch in {work}", flush=True)
    for index, name in enumerate(STEPS, start=1):
        print(f"[{index}/{len(STEPS)}] {TITLES[name]} ...", flush=True)
        step = run_step(name, run)
        report["steps"][name] = asdict(step)
        print(f"[{index}/{len(STEPS)}] {TITLES[name]}: {step.status} ({step.seconds:.0f} s)"
              + (f": {step.error.splitlines()[0]}" if step.error else ""), flush=True)
        report["wall_s"] = round(run.budget.elapsed(), 1)
        write_report(report, out)  # after every step: a crash later still leaves the steps before it
    statuses = [report["steps"][name]["status"] for name in STEPS]
    report["summary"] = {status: statuses.count(status) for status in sorted(set(statuses))}
    report["markdown"] = markdown_table(report)
    write_report(report, out)
    print()
    print(report["markdown"])
    print()
    print(f"{len(STEPS)} steps in {report['wall_s']:.0f} s: "
          + ", ".join(f"{count} {status}" for status, count in report["summary"].items()) + f". Report: {out}")
    return report


def exit_code(report: dict) -> int:
    """1 when a step failed or broke, so scripts and CI can tell; cut short and skipped are not failures."""
    return int(any(step["status"] in ("failed", "error") for step in report["steps"].values()))


if __name__ == "__main__":
    sys.exit(exit_code(main(get_args())))
