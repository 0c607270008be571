"""Train the 3D Improved UNet on HipMRI-layout data (or, without --data-root, on the phantom).

    python train.py --out runs/demo                       # one process, CPU or one GPU
    python train.py --out runs/fold0 --folds 5 --fold 0   # one cross-validation fold
    torchrun --nproc_per_node=4 train.py --out runs/ddp   # DistributedDataParallel

RUN_DIR receives config.json, splits.json, metrics.csv, training_curves.png, last.pt (the full
state, every epoch), best.pt (weights and settings of the best validation epoch) and
postprocessing.json (the post-processing decided on the validation patients). --resume
continues from last.pt with the run's own settings.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import Dataset
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from pelvicseg.atomic import write_text
from pelvicseg.checkpoint import load_checkpoint, save_checkpoint
from pelvicseg.distributed import (Context, agree_to_stop, all_reduce_sum, check_replicas_identical, gather_lists,
                                   setup_distributed)
from pelvicseg.cli import explicit_flags, run_cli
from dataset import (CLASS_NAMES, DeviceAugmentation, augmentation, cached_dataset, cases_in,
                     choose_spacing, class_voxel_counts, class_weights_from_counts, find_cases, load_or_make_split,
                     read_nifti_header)
from pelvicseg.evaluation import evaluate_volume, with_postprocessing
from pelvicseg.inference import (PREDICTION_OVERLAP, autocast_dtype, decide_postprocessing, load_source,
                                 out_of_memory_message, predict_probabilities)
from pelvicseg.lock import lock_on_main_rank
from pelvicseg.metrics import (dice_from_counts, dice_per_class, json_ready, nan_mean, overlap_counts,
                               write_rows)
from modules import ImprovedUNet3D, count_parameters
from pelvicseg.progress import progress as report_progress
from pelvicseg.errors import DataError, TrainingDiverged
from pelvicseg.training import (SCHEDULES, EpochSampler, Trainer, compute_loss, divergence_message, epoch_seed,
                                learning_rate, make_loss, make_optimizer, parameters_finite, seed_random_generators,
                                training_loader)
from pelvicseg.uncertainty import describe_held_out, fit_from_volumes, review_settings

DEFAULT_PHANTOM = Path("data/phantom")
# A log gets a training or validation progress line once a pass has run this long, then this often:
# the demo's passes (seconds) stay silent, the defaults' on a CPU (minutes) do not.
EPOCH_QUIET_S = 60.0
DEFAULT_CHANNELS = (32, 64, 128, 256)
# Settings a resumed run may take from the new command line: where things are and how to run,
# not what is trained. Every other setting comes back from the checkpoint.
OPERATIONAL_FLAGS = {"out", "resume", "debug", "workers", "device", "data_root", "explicit", "deterministic"}
EXTENDABLE_FLAGS = {"epochs", "patience"}
# The class weights' power. Runs written before the flag existed used inverse square-root weights,
# and resume with them.
CLASS_WEIGHT_POWER = 0.25
BEFORE_THE_FLAG = {"class_weight_power": 0.5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the 3D Improved UNet for pelvic MRI segmentation.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", help="HipMRI-layout folder; without it the phantom in data/phantom/ "
                        "is generated once and used")
    parser.add_argument("--out", default="runs/default", help="run folder for checkpoints, metrics and curves")
    parser.add_argument("--epochs", type=int, default=40, help="maximum number of epochs (may be raised on --resume)")
    parser.add_argument("--steps-per-epoch", type=int,
                        help="optimiser steps in an epoch, whatever the number of training volumes (nnU-Net's "
                        "epoch): crops are drawn from the cached volumes in shuffled rounds seeded by (seed, epoch, "
                        "rank), so a volume may give several crops in one epoch; 0: one pass over the training "
                        "volumes (default: 250 on CUDA, 0 on a CPU)")
    parser.add_argument("--val-every", type=int, default=1,
                        help="validate (model selection, early stopping) every K epochs and after the last one; "
                        "metrics.csv leaves the validation columns of the other epochs empty")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="volumes per step and process; above 1 needs --patch-size (volumes differ in size)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam: Adam with a cosine decay; sgd: nnU-Net's recipe, SGD with Nesterov momentum "
                        "0.99 and a poly decay (exponent 0.9; try --lr 1e-2)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate: reached after --warmup-steps, then decayed per step (Adam: "
                        "cosine to 1/100, SGD: poly towards 0) at the run's last step")
    parser.add_argument("--warmup-steps", type=int,
                        help="optimiser steps of linear learning-rate warm-up from 1/100 of --lr (default: 50 on "
                        "CUDA, 0 on a CPU)")
    parser.add_argument("--weight-decay", type=float, default=1e-5, help="L2 weight decay of the optimiser")
    parser.add_argument("--loss", choices=("ce", "dice", "combined"), default="combined",
                        help="class-weighted cross-entropy, Dice, or both summed (MONAI DiceCELoss)")
    parser.add_argument("--class-weighting", choices=("ce-dice", "ce", "none"), default="ce-dice",
                        help="class weights (see --class-weight-power) in both loss terms, in the "
                        "cross-entropy only, or in neither")
    parser.add_argument("--class-weight-power", type=float, default=CLASS_WEIGHT_POWER,
                        help="each class weighs (its share of the training voxels) to the minus this power, "
                        "normalised to mean 1: 0.5 is inverse square-root frequency, 0 weighs all alike "
                        f"(default {CLASS_WEIGHT_POWER})")
    parser.add_argument("--crop-ratios", type=float, nargs="+",
                        help="with --patch-size: relative frequency of training crops centred on each class, in "
                        "label order (default: 0.5 for background, 1 for every other class)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="voxel spacing in mm (LPS order) every volume is resampled to (default: twice the "
                        "training set's median spacing, i.e. half resolution)")
    parser.add_argument("--spatial-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="instead of --spacing: the array size a median training volume gets (LPS order; "
                        "turned into a spacing from the median training field of view)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="random training crop and sliding-window size in voxels (default: whole volumes)")
    parser.add_argument("--channels", type=int, nargs=4, default=DEFAULT_CHANNELS,
                        help="widths of the four resolution steps (bottleneck: twice the last)")
    parser.add_argument("--dropout", type=float, default=0.0, help="Dropout3d probability in every block")
    parser.add_argument("--deep-supervision", action="store_true", help="extra losses on two lower decoder levels")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing: less GPU memory, about 30%% more compute")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="regional torch.compile of the network's blocks (auto: on for CUDA)")
    parser.add_argument("--augment", choices=("device", "loader"), default="device",
                        help="where elastic/rotation/flip/intensity augmentation runs: batched on the training "
                        "device (fast) or per sample in the loader with MONAI transforms")
    parser.add_argument("--overlap", type=float, default=0.25,
                        help="sliding-window overlap of the per-epoch validation, which only ranks epochs; the "
                        f"final validation of best.pt uses predict.py's {PREDICTION_OVERLAP}, since the "
                        "post-processing and review rule fitted there must match what predict.py computes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many epochs without a better validation mean foreground Dice "
                        "(may be changed on --resume)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, weights and augmentation")
    parser.add_argument("--folds", type=int, help="cross-validation: split the non-test patients into K folds")
    parser.add_argument("--fold", type=int, help="with --folds: the fold validated in this run (0..K-1)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/last.pt with its settings; only --epochs and --patience may "
                        "differ (and --data-root, --device, --workers)")
    parser.add_argument("--no-amp", action="store_true",
                        help="full float32 precision (default: bf16/fp16 autocast on CUDA, bf16 on CPUs with "
                        "native bf16)")
    parser.add_argument("--workers", type=int,
                        help="data-loading worker processes (default: up to 4 on CUDA; 0 on a CPU, where workers "
                        "would share the cores with the training step)")
    parser.add_argument("--class-names", nargs="+", default=list(CLASS_NAMES),
                        help="label names in label-value order; their number is the number of classes")
    parser.add_argument("--phantom-patients", type=int, default=10, help="patients in the default phantom")
    parser.add_argument("--phantom-weeks", type=int, default=3, help="weeks per patient in the default phantom")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic cuDNN algorithms (default: cuDNN's autotuner picks the fastest on CUDA)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.explicit = sorted(explicit_flags(parser, argv))
    return args


# ----------------------------------------------------------------------------- settings

def plain_config(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "explicit"}


def restore_settings(args: argparse.Namespace, stored: dict) -> None:
    """--resume: every setting comes back from the checkpoint. --epochs and --patience given again
    extend the run; any other training flag given with a different value is an error naming it."""
    explicit = set(getattr(args, "explicit", []))
    for key, value in {**BEFORE_THE_FLAG, **stored}.items():
        if key in OPERATIONAL_FLAGS and getattr(args, key, None) is not None:
            continue
        if key in EXTENDABLE_FLAGS and key in explicit:
            continue
        if key in explicit and _same(getattr(args, key), value) is False:
            flag = "--" + key.replace("_", "-")
            raise DataError(f"{args.out}: {flag} {_shown(getattr(args, key))} differs from the resumed run's "
                            f"{_shown(value)}; a resumed run keeps its settings (only --epochs and --patience "
                            "may change)")
        setattr(args, key, value)


def _same(a, b) -> bool:
    normal = lambda v: [float(x) if isinstance(x, (int, float)) else x for x in v] if isinstance(v, (list, tuple)) else v
    return normal(a) == normal(b)


def _shown(value) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def steps_per_epoch(args: argparse.Namespace, num_volumes: int, world_size: int) -> int:
    """Optimiser steps in one epoch: --steps-per-epoch, or with 0 one pass over the training
    volumes (DistributedSampler's share of this rank, in batches)."""
    if args.steps_per_epoch:
        return args.steps_per_epoch
    return math.ceil(math.ceil(num_volumes / world_size) / args.batch_size)


# The recipe's defaults where they depend on the device: on CUDA nnU-Net's epoch of 250 steps and a
# short warm-up; on a CPU (the tests' tiny runs) one pass over the training volumes and none.
# Loader workers: on CUDA they prepare crops while the GPU steps; on a CPU they take cores from
# the step itself (2 cores, the demo's 25 steps: 7.3 s with none against 8.7-9.5 s with 2).
DEVICE_DEFAULTS = {"cuda": {"steps_per_epoch": 250, "warmup_steps": 50, "workers": min(4, os.cpu_count() or 1)},
                   "cpu": {"steps_per_epoch": 0, "warmup_steps": 0, "workers": 0}}


def resolve_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fills the settings left unset whose default depends on the device; config.json and the
    checkpoint then hold the value used, so --resume on another device continues the same run."""
    for key, value in DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def validates(epoch: int, args: argparse.Namespace) -> bool:
    """The validation cadence: every --val-every epochs, and always after the last epoch."""
    return epoch % max(args.val_every, 1) == 0 or epoch == args.epochs


def set_up_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    """Once, at the start of a run: the global generators from ``seed``; with ``deterministic``
    MONAI's set_determinism (which also forces deterministic cuDNN and turns its autotuner off),
    otherwise cuDNN's autotuner on CUDA, which picks the fastest 3D convolution algorithms."""
    if deterministic:
        set_determinism(seed=seed)
    else:
        seed_random_generators(seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------- run folder

def write_metrics_row(path: Path, row: dict) -> None:
    """The whole CSV written again (atomically) with the epoch's row: a kill never leaves half a row."""
    rows = []
    if path.exists():
        with open(path, newline="") as handle:
            # the new row's columns for every row: a run resumed by a version that adds one stays one table
            rows = [{key: r.get(key, "") for key in row} for r in csv.DictReader(handle)
                    if int(r["epoch"]) < int(row["epoch"])]
    write_rows(rows + [row], path)


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """On resume, drop rows of epochs after the checkpoint (an interrupted epoch's row, if any)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    write_rows([r for r in rows if int(r["epoch"]) <= last_epoch], path)


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, keep last.pt of the last whole epoch, exit cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            return  # a SIGTERM again (torchrun forwards the one the process group already got): same stop
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step.", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def ensure_default_phantom(args: argparse.Namespace, context: Context) -> Path:
    """The embedded default data: generated once into data/phantom/, reused afterwards."""
    marker = DEFAULT_PHANTOM / "phantom.json"
    wanted = {"patients": args.phantom_patients, "weeks": args.phantom_weeks, "seed": 0}
    if context.is_main and (not marker.exists() or json.loads(marker.read_text()) != wanted):
        from pelvicseg import phantom

        print(f"Generating the default phantom ({args.phantom_patients} patients x {args.phantom_weeks} weeks) "
              f"into {DEFAULT_PHANTOM}/ ...", flush=True)
        phantom.write_phantom(DEFAULT_PHANTOM, patients=args.phantom_patients, weeks=args.phantom_weeks, seed=0)
        write_text(marker, json.dumps(wanted))
    if context.distributed:
        dist.barrier()
    return DEFAULT_PHANTOM


# ----------------------------------------------------------------------------- steps of a run

@dataclass
class Data:
    split: dict
    class_names: list
    train_data: Dataset
    val_cache: object
    val_cases: list
    class_weights: torch.Tensor


@dataclass
class Model:
    model: torch.nn.Module
    network: torch.nn.Module  # the model, wrapped in DistributedDataParallel when distributed
    model_args: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    amp_dtype: torch.dtype | None
    compiled: bool
    trainer: Trainer


@dataclass
class Progress:
    start_epoch: int = 1
    best_metric: float = -math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    stopped_early: bool = False
    interrupted: bool = False
    diverged: str | None = None  # the one-line message when training diverged
    trained_epochs: int = 0  # epochs trained by this command (0: a finished run resumed)
    previous_end: str | None = None  # how the resumed run had ended
    finished: bool = False  # the epoch loop ran to its end
    started: float = field(default_factory=time.time)  # when this command started
    elapsed_before: float = 0.0  # wall seconds of the commands before a --resume

    def elapsed_seconds(self) -> float:
        """Wall seconds since the run started (set-up included), summed over resumed commands."""
        return self.elapsed_before + time.time() - self.started

    @property
    def end_reason(self) -> str:
        """Why the run ended ("running" while it trains), recorded in last.pt."""
        if self.diverged:
            return "diverged"
        if self.interrupted:
            return "interrupted"
        if self.stopped_early:
            return "early_stop"
        return "completed" if self.finished else "running"


def setup_run(args: argparse.Namespace) -> tuple[Context, Path, dict | None]:
    """Process group and device, the run folder, and on --resume the checkpoint's settings."""
    context = setup_distributed(args.device)
    run_dir = Path(args.out)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if context.is_main and not args.resume and (last_path.exists() or best_path.exists()):
        raise DataError(f"{run_dir}: already holds a run (last.pt/best.pt); pass --resume to continue it "
                        "or choose another --out")
    resume_state = None
    if args.resume and not last_path.exists():
        # Killed before its first epoch's last.pt (best.pt, written just before it, may be there):
        # nothing to resume, the run starts again at epoch 1.
        if context.is_main:
            print(f"{run_dir}: no last.pt to resume (the run ended before its first epoch did); starting at epoch 1",
                  flush=True)
    elif args.resume:
        resume_state = load_checkpoint(last_path)
    if resume_state is not None:
        if "optimizer" not in resume_state:
            raise DataError(f"{last_path}: holds weights only, not the state to resume a run")
        restore_settings(args, resume_state["config"])
    resolve_device_defaults(args, context.device)
    if args.batch_size > 1 and not args.patch_size:
        raise DataError(f"{run_dir}: --batch-size {args.batch_size} needs --patch-size: whole volumes differ in size "
                        "after resampling to one spacing, so only crops can be batched")
    if (args.folds is None) != (args.fold is None):
        raise DataError(f"{run_dir}: --folds and --fold go together")
    if args.class_weight_power < 0:
        raise DataError(f"{run_dir}: --class-weight-power {args.class_weight_power:g} would weigh the common "
                        "classes most; give 0 (no weighting) or more")
    return context, run_dir, resume_state


def setup_data(args: argparse.Namespace, context: Context, run_dir: Path, resumed: bool) -> Data:
    """Cases, the split (or fold), the target spacing, cached preprocessing and class weights."""
    class_names = list(args.class_names)
    data_root = Path(args.data_root) if args.data_root else ensure_default_phantom(args, context)
    args.data_root = str(data_root)
    cases = find_cases(data_root)
    created = [path for path in (run_dir, run_dir / "splits.json") if not path.exists()]
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if context.distributed:
        dist.barrier()
    try:
        return prepare_data(args, context, run_dir, resumed, cases, class_names, data_root)
    except BaseException:
        # A failed start leaves nothing behind: the next command is not told the run exists.
        if context.is_main:
            for path in reversed(created):
                if path.is_file():
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        raise


def prepare_data(args, context: Context, run_dir: Path, resumed: bool, cases, class_names, data_root) -> Data:
    num_classes = len(class_names)
    split = (load_or_make_split(cases, run_dir / "splits.json", args.seed, args.folds, args.fold)
             if context.is_main else None)
    split = gather_lists([split], context)[0]
    train_cases, val_cases = cases_in(cases, split["train"]), cases_in(cases, split["val"])
    if not train_cases or not val_cases:
        raise DataError(f"{data_root}: the split leaves no training or no validation volumes")
    if not resumed:
        # With folds the spacing comes from all non-test patients, so every fold resamples to the
        # same grid and the folds can be ensembled; without, from the training patients.
        spacing_cases = train_cases + val_cases if args.folds else train_cases
        args.spacing, args.spacing_source = choose_spacing(spacing_cases, args.spacing, args.spatial_size)
        if args.folds:
            args.spacing_source = args.spacing_source.replace("training", "non-test (all folds)")

    show_progress = context.is_main and sys.stderr.isatty()
    if context.is_main and not show_progress:
        print(f"Preprocessing {len(train_cases)} training and {len(val_cases)} validation volume(s) into memory ...",
              flush=True)
    cache_workers = min(os.cpu_count() or 1, 4)  # preprocessing runs before any step: every core helps
    train_cache = cached_dataset(train_cases, args.spacing, num_classes, cache_workers, progress=show_progress,
                                 crop_indices=args.patch_size is not None)
    val_cache = cached_dataset(val_cases, args.spacing, num_classes, cache_workers, progress=show_progress)
    if not resumed:
        # Sliding windows for validation and prediction: the crop, or for whole-volume training the
        # median training volume rounded up to the network's multiple of 16. Larger fields of view
        # then only mean more windows.
        shapes = np.array([item["image"].shape[1:] for item in train_cache._cache])
        args.roi_size = list(args.patch_size) if args.patch_size else [
            int(math.ceil(s / 16) * 16) for s in np.median(shapes, axis=0)]
    counts = class_voxel_counts(train_cache, num_classes)
    class_weights = torch.as_tensor(class_weights_from_counts(counts, args.class_weight_power))
    # Crops centred on each foreground class equally often, background rarely: rare organs are seen.
    crop_ratios = list(args.crop_ratios) if args.crop_ratios else [0.5] + [1.0] * (num_classes - 1)
    if len(crop_ratios) != num_classes:
        raise DataError(f"--crop-ratios: {len(crop_ratios)} value(s) for {num_classes} classes")
    train_data = Dataset(train_cache, transform=augmentation(args.patch_size, num_classes, crop_ratios,
                                                             spatial_on_device=args.augment == "device"))
    if context.is_main:
        print_banner(args, context, split, len(train_cases), len(val_cases))
        used = {"ce-dice": "in both loss terms", "ce": "in the cross-entropy only", "none": "not used"}
        print(f"Class weights (training voxel counts to the power -{args.class_weight_power:g}; "
              f"{used[args.class_weighting]}): " + ", ".join(
            f"{n} {w:.2f}" for n, w in zip(class_names, class_weights.tolist())))
        write_text(run_dir / "config.json", json.dumps(plain_config(args), indent=2) + "\n")
    return Data(split, class_names, train_data, val_cache, val_cases, class_weights)


def setup_model(args: argparse.Namespace, context: Context, data: Data, resume_state: dict | None,
                progress: Progress) -> Model:
    device = context.device
    model_args = {"in_channels": 1, "out_channels": len(data.class_names), "channels": list(args.channels),
                  "dropout": args.dropout, "deep_supervision": args.deep_supervision,
                  "gradient_checkpointing": args.checkpointing}
    set_up_determinism(args.seed, args.deterministic, device)
    model = ImprovedUNet3D(**model_args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)
    amp_dtype = autocast_dtype(device, enabled=not args.no_amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        progress.start_epoch = int(resume_state["epoch"]) + 1
        progress.best_metric, progress.best_epoch = float(resume_state["best_metric"]), int(resume_state["best_epoch"])
        progress.stale_epochs = int(resume_state["epochs_without_improvement"])
        progress.previous_end = resume_state.get("end_reason")
        progress.elapsed_before = float(resume_state.get("elapsed_seconds", 0.0))
        if context.is_main:
            truncate_metrics(Path(args.out) / "metrics.csv", progress.start_epoch - 1)
            print(f"Resuming {Path(args.out) / 'last.pt'} after epoch {progress.start_epoch - 1} "
                  f"(best {progress.best_metric:.4f} at epoch {progress.best_epoch})")
    if context.is_main:
        print(f"ImprovedUNet3D: {count_parameters(model):,} parameters")
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if compiled:
        for block in model.blocks():
            block.compile()  # regional: each block compiled once, reused for every call of its kind
    network = model
    if context.distributed:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = make_loss(args.loss, data.class_weights.to(device), args.class_weighting)
    trainer = Trainer(network, optimizer, scaler, loss_fn, args.loss, amp_dtype)
    return Model(model, network, model_args, optimizer, scaler, loss_fn, amp_dtype, compiled, trainer)


def train_one_epoch(args, context: Context, model: Model, loader, stop: StopRequest, num_classes: int,
                    device_augmentation=None, generator: torch.Generator | None = None, schedule=None,
                    first_step: int = 0) -> dict:
    """One epoch of ``Trainer.step``, each step's learning rate ``schedule(global step)`` counted
    from ``first_step``. Returns the mean loss over the steps taken, per-class Dice on the training
    crops, the number of skipped (non-finite) steps, the last step's learning rate, whether the
    epoch completed, and whether training diverged (too many non-finite steps in a row)."""
    device = context.device
    model.network.train()
    sums = torch.zeros(3 + 3 * num_classes, dtype=torch.float64)  # loss sum, steps, skipped, tp/fp/fn per class
    outcome = {"loss": math.nan, "dice": np.full(num_classes, np.nan), "skipped": 0, "completed": False,
               "diverged": False, "lr": model.optimizer.param_groups[0]["lr"]}
    for index, batch in enumerate(report_progress(loader, "train", enabled=context.is_main, quiet_for_s=EPOCH_QUIET_S,
                                 interval_s=EPOCH_QUIET_S)):
        if agree_to_stop(stop.requested, context):
            return outcome
        if schedule is not None:
            outcome["lr"] = schedule(first_step + index)
            for group in model.optimizer.param_groups:
                group["lr"] = outcome["lr"]
        images = batch["image"].to(device, non_blocking=True).as_tensor()
        labels = batch["label"].to(device, non_blocking=True).as_tensor()
        if device_augmentation is not None:
            images, labels = device_augmentation(images, labels, generator)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last_3d)
        step = model.trainer.step(images, labels)
        if step.skipped:
            sums[2] += 1
            if model.trainer.diverged:  # the same on every rank: decided on the averaged gradients
                outcome["diverged"] = True
                return outcome
            continue
        with torch.no_grad():
            sums[3:] += torch.from_numpy(overlap_counts(step.logits.argmax(1), labels[:, 0], num_classes).reshape(-1))
        sums[0] += step.loss
        sums[1] += 1
    if agree_to_stop(stop.requested, context):
        return outcome
    sums = all_reduce_sum(sums, context)
    outcome.update(loss=float(sums[0] / sums[1]) if sums[1] > 0 else math.nan,
                   dice=dice_from_counts(sums[3:].numpy().reshape(num_classes, 3)), skipped=int(sums[2]),
                   completed=True)
    return outcome


def validate(args, context: Context, model: Model, data: Data) -> dict:
    """Per-epoch model selection: sliding-window inference on the validation volumes (split over
    ranks, gathered), loss and per-class Dice on the preprocessed grid against the preprocessed
    labels. Cheap: nothing is resampled back to the source grid (the final validation of best.pt,
    ``final_validation``, is on the source grid, as predict.py reports). Returns the mean loss and
    the mean Dice per class; NaN loss when the network's output is not finite."""
    model.model.eval()
    num_classes = len(data.class_names)
    results = []
    indices = range(context.rank, len(data.val_cache), context.world_size)
    for index in report_progress(indices, "validation", enabled=context.is_main, quiet_for_s=EPOCH_QUIET_S,
                                 interval_s=EPOCH_QUIET_S):
        item = data.val_cache[index]
        label = item["label"][None].to(context.device).as_tensor()
        probabilities = predict_probabilities(model.model, item["image"][None], args.roi_size, args.overlap, False,
                                              model.amp_dtype)
        with torch.no_grad():
            # The loss on probabilities turned back into log-space logits: the same objective as training.
            loss = compute_loss(model.loss_fn, args.loss, torch.log(probabilities.clamp_min(1e-8)), label)
            finite = bool(torch.isfinite(probabilities).all())
        dice = dice_per_class(probabilities[0].argmax(0), label[0, 0], num_classes)
        results.append({"loss": float(loss) if finite else math.nan, "dice": dice.tolist()})
    results = gather_lists(results, context)
    dice = np.array([r["dice"] for r in results], dtype=float).reshape(-1, num_classes)
    return {"loss": float(np.mean([r["loss"] for r in results])) if results else math.nan,
            "dice": np.array([nan_mean(dice[:, c]) for c in range(num_classes)])}


def final_validation(args, context: Context, model: Model, data: Data) -> list[dict]:
    """best.pt on every validation volume through ``evaluation.evaluate_volume``, as predict.py
    evaluates a test volume (source grid, predict.py's overlap, no TTA), with each organ's figures
    with and without its largest-component step: the records the post-processing decision and
    the review rule are fitted on."""
    model.model.eval()
    records = []
    indices = range(context.rank, len(data.val_cache), context.world_size)
    for index in report_progress(indices, "final validation", enabled=context.is_main):
        item, case = data.val_cache[index], data.val_cases[index]
        probabilities = predict_probabilities(model.model, item["image"][None], args.roi_size, PREDICTION_OVERLAP,
                                              False, model.amp_dtype)[0].cpu()
        target = load_source(case.label)[0]
        result = evaluate_volume(probabilities, item["image"], read_nifti_header(case.image), data.class_names,
                                 target=target, alternatives=True)
        records.append({"case": case.case_id, "patient": case.patient, **{key: result[key] for key in (
            "dice", "hd95", "uncertainty", "dice_lcc", "hd95_lcc", "uncertainty_lcc")}})
    return gather_lists(records, context)


def checkpoint_state(args, data: Data, model: Model, progress: Progress, epoch: int) -> dict:
    """last.pt: everything to resume. best.pt takes the weights-only subset (``weights_only_state``)."""
    return {**weights_only_state(args, data, model, progress, epoch), "optimizer": model.optimizer.state_dict(),
            "scaler": model.scaler.state_dict(), "epochs_without_improvement": progress.stale_epochs,
            "rng": {"torch": torch.get_rng_state()}, "end_reason": progress.end_reason,
            "elapsed_seconds": progress.elapsed_seconds()}


def weights_only_state(args, data: Data, model: Model, progress: Progress, epoch: int) -> dict:
    """What prediction and sharing need, a third of last.pt: the optimizer's moments are left out."""
    return {"model": model.model.state_dict(), "model_args": model.model_args, "config": plain_config(args),
            "class_names": data.class_names, "split": data.split, "epoch": epoch,
            "best_metric": progress.best_metric, "best_epoch": progress.best_epoch,
            "class_weights": data.class_weights.tolist(), "modality": "MR"}


def run_epochs(args, context: Context, data: Data, model: Model, progress: Progress) -> None:
    """Epochs of --steps-per-epoch steps each, the learning rate set per step from the global step,
    validation on the --val-every cadence; ``record_epoch`` keeps the books."""
    run_dir = Path(args.out)
    num_classes = len(data.class_names)
    device_augmentation = DeviceAugmentation() if args.augment == "device" else None
    steps = steps_per_epoch(args, len(data.train_data), context.world_size)
    total_steps = steps * args.epochs
    pass_sampler = (DistributedSampler(data.train_data, shuffle=True, seed=args.seed)
                    if context.distributed and not args.steps_per_epoch else None)
    epoch = progress.start_epoch - 1
    with StopRequest() as stop:
        for epoch in range(progress.start_epoch, args.epochs + 1):
            if progress.stale_epochs >= args.patience:  # a resumed run that had stopped early
                progress.stopped_early = True
                break
            started = time.time()
            # Seeded from (seed, epoch, rank): a resumed run draws the same volumes, crops and
            # augmentations, consecutive epochs and ranks draw their own.
            seed = epoch_seed(args.seed, epoch, context.rank)
            seed_random_generators(seed)
            if pass_sampler is not None:
                pass_sampler.set_epoch(epoch)
            sampler = pass_sampler or (EpochSampler(len(data.train_data), steps * args.batch_size, seed)
                                       if args.steps_per_epoch else None)
            loader = training_loader(data.train_data, args.batch_size, args.workers, seed, sampler,
                                     pin_memory=context.device.type == "cuda")
            schedule = lambda step: learning_rate(step, total_steps, args.lr, args.warmup_steps,  # noqa: E731
                                                  SCHEDULES[args.optimizer])
            try:
                outcome = train_one_epoch(args, context, model, loader, stop, num_classes, device_augmentation,
                                          torch.Generator(context.device).manual_seed(seed), schedule,
                                          (epoch - 1) * steps)
            except torch.OutOfMemoryError:
                raise SystemExit(out_of_memory_message("training", args.patch_size)) from None
            if outcome["diverged"]:
                progress.diverged = divergence_message(epoch, model.trainer.nonfinite_in_a_row, model.amp_dtype,
                                                       outcome["lr"], progress.best_epoch)
                break
            if not outcome["completed"]:
                progress.interrupted = True
                break
            train_seconds = time.time() - started
            validation = None
            if validates(epoch, args):
                try:
                    validation = validate(args, context, model, data)
                except torch.OutOfMemoryError:
                    raise SystemExit(out_of_memory_message("validation", args.roi_size)) from None
                validation["seconds"] = time.time() - started - train_seconds
            progress.trained_epochs += 1
            improved = judge_validation(progress, model, validation, epoch)
            if context.is_main:
                record_epoch(args, data, model, progress, epoch, outcome, validation, improved, train_seconds)
            if progress.stale_epochs >= args.patience:
                progress.stopped_early = True
                if context.is_main:
                    print(f"Early stopping: no better validation Dice for {args.patience} epochs.")
                break
            if agree_to_stop(stop.requested, context):
                progress.interrupted = True
                break
    progress.finished = not progress.interrupted and not progress.diverged
    if context.is_main and not progress.interrupted and (run_dir / "last.pt").exists():
        if progress.trained_epochs == 0 and not progress.diverged:
            print(f"Nothing to train: the run ended at epoch {epoch} ({progress.previous_end or 'completed'}); raise "
                  "--epochs or --patience to train on.")
        else:
            # Why the run ended, so that --resume does not train a finished run again.
            state = load_checkpoint(run_dir / "last.pt")
            state["end_reason"] = progress.end_reason
            save_checkpoint(state, run_dir / "last.pt")


def judge_validation(progress: Progress, model: Model, validation: dict | None, epoch: int) -> bool:
    """Whether this epoch's validation is the best so far (then best.pt is written). Patience counts
    epochs since the best validated one, updated at each validation: between validations the count
    stands still, so early stopping acts only on what a validation has shown. A non-finite
    validation (or weights) is never the best: best.pt keeps the last finite model."""
    if validation is None:
        return False
    validation["mean_fg"] = mean_fg = nan_mean(validation["dice"][1:])
    improved = (math.isfinite(mean_fg) and math.isfinite(validation["loss"]) and mean_fg > progress.best_metric
                and parameters_finite(model.model))
    if improved:
        progress.best_metric, progress.best_epoch = mean_fg, epoch
    progress.stale_epochs = epoch - progress.best_epoch
    return improved


def record_epoch(args, data: Data, model: Model, progress: Progress, epoch: int, outcome: dict,
                 validation: dict | None, improved: bool, train_seconds: float) -> None:
    """Rank 0's books after an epoch: the metrics.csv row, last.pt (and best.pt when improved), the
    training curves and the epoch's line. An epoch without validation leaves the validation
    columns (val_loss, dice_*, mean_fg_dice, val_seconds) empty."""
    run_dir = Path(args.out)
    names = data.class_names
    elapsed = progress.elapsed_seconds()
    val = validation or {}
    val_dice = val.get("dice", [None] * len(names))
    row = {"epoch": epoch, "train_loss": outcome["loss"], "val_loss": val.get("loss")}
    row.update({f"dice_{n}": val_dice[c] for c, n in enumerate(names)})
    row.update({"mean_fg_dice": val.get("mean_fg"), "lr": outcome["lr"],
                "seconds": train_seconds + val.get("seconds", 0.0), "train_seconds": train_seconds,
                "val_seconds": val.get("seconds"), "elapsed_seconds": elapsed, "skipped_steps": outcome["skipped"]})
    row.update({f"train_dice_{n}": outcome["dice"][c] for c, n in enumerate(names)})
    write_metrics_row(run_dir / "metrics.csv", row)
    # best.pt before last.pt: a kill between the two leaves last.pt at the epoch before, which
    # --resume trains again, never a last.pt naming a best epoch best.pt lacks.
    if improved:
        save_checkpoint(weights_only_state(args, data, model, progress, epoch), run_dir / "best.pt")
    save_checkpoint(checkpoint_state(args, data, model, progress, epoch), run_dir / "last.pt")
    from pelvicseg.figures import save_training_curves
    save_training_curves(run_dir / "metrics.csv", names, run_dir / "training_curves.png")
    skipped = f"  skipped {outcome['skipped']} non-finite step(s)" if outcome["skipped"] else ""
    if validation is None:
        scores = f"loss {outcome['loss']:.4f}  (no validation)"
    else:
        scores = (f"loss {outcome['loss']:.4f}/{validation['loss']:.4f}  dice "
                  + " ".join(f"{n[:4]} {d:.3f}" for n, d in zip(names[1:], val_dice[1:]))
                  + f"  fg {validation['mean_fg']:.4f}")
    print(f"epoch {epoch:3d}/{args.epochs}  {scores}  lr {outcome['lr']:.2e}  {train_seconds:.1f}+"
          f"{val.get('seconds', 0.0):.1f}s  elapsed {elapsed:.0f}s" + skipped + ("  best" if improved else ""),
          flush=True)


def finish(args, context: Context, data: Data, model: Model, progress: Progress) -> None:
    """Fit post-processing and the review rule on the validation patients with the best weights
    (unless a finished run was resumed with nothing to train and both are there), report, and
    check that all ranks ended with the same weights."""
    run_dir = Path(args.out)
    already_fitted = (progress.trained_epochs == 0 and (run_dir / "postprocessing.json").exists()
                      and (run_dir / "uncertainty.json").exists())
    if not progress.interrupted and (run_dir / "best.pt").exists() and not already_fitted:
        if context.distributed:
            dist.barrier()  # rank 0 wrote best.pt
        model.model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
        records = final_validation(args, context, model, data)
        if context.is_main:
            write_validation_fits(run_dir, records, data.class_names)
    if context.is_main:
        if progress.interrupted:
            print(f"Interrupted. {run_dir / 'last.pt'} holds the last completed epoch; continue with --resume.")
        elif progress.best_epoch:
            print(f"Done{' (early stop)' if progress.stopped_early else ''}. Best validation mean foreground Dice "
                  f"{progress.best_metric:.4f} (preprocessed grid) at epoch {progress.best_epoch}: {run_dir / 'best.pt'}")
    if context.distributed:
        message = check_replicas_identical(model.model)
        if context.is_main:
            print(message, flush=True)
        dist.barrier()
        # The DistributedDataParallel wrapper goes before its process group: destroyed after it,
        # at the end of main, its reducer could wait on a gloo group that no longer exists.
        model.network = model.trainer.network = model.model
        gc.collect()
        dist.destroy_process_group()
    if progress.diverged:
        raise TrainingDiverged(progress.diverged)


def write_validation_fits(run_dir: Path, records: list[dict], class_names: list[str]) -> None:
    """postprocessing.json: the largest-component decision with the per-volume figures behind it.
    uncertainty.json: the review rule fitted on the validation volumes as predict.py will see
    them (post-processed, no TTA, predict.py's overlap), those settings, and the per-volume scores
    and Dice (so an ensemble can refit on the pooled validation volumes of all its members)."""
    decision = decide_postprocessing(records, class_names)
    decision["volumes"] = [{key: r[key] for key in ("case", "dice", "hd95", "dice_lcc", "hd95_lcc")} for r in records]
    write_text(run_dir / "postprocessing.json", json.dumps(json_ready(decision), indent=2) + "\n")
    kept = decision["largest_component"]
    selected = [with_postprocessing(r, kept, class_names) for r in records]
    rule = fit_from_volumes(selected, class_names)
    rule["settings"] = review_settings(tta=False, overlap=PREDICTION_OVERLAP, largest_component=kept)
    rule["volumes"] = [{key: r[key] for key in ("case", "patient", "uncertainty", "dice", "hd95")} for r in selected]
    write_text(run_dir / "uncertainty.json", json.dumps(json_ready(rule), indent=2) + "\n")
    dice = np.array([r["dice"] for r in selected], dtype=float).reshape(-1, len(class_names))
    print(f"Final validation of best.pt on {len(records)} volume(s), each on its source grid with the decided "
          f"post-processing (largest connected component kept for {', '.join(kept) or 'no organ'}): "
          + " ".join(f"{n} {nan_mean(dice[:, c]):.3f}" for c, n in enumerate(class_names) if c > 0), flush=True)
    print(f"Review rule (uncertainty.json): {describe_held_out(rule['held_out'])}", flush=True)


def main(args: argparse.Namespace) -> dict:
    progress = Progress()
    with lock_on_main_rank(args.out):  # one command at a time in the run folder
        context, run_dir, resume_state = setup_run(args)
        data = setup_data(args, context, run_dir, resumed=resume_state is not None)
        model = setup_model(args, context, data, resume_state, progress)
        run_epochs(args, context, data, model, progress)
        finish(args, context, data, model, progress)
    return {"epoch": progress.best_epoch, "mean_fg_dice": progress.best_metric}


def print_banner(args, context: Context, split, n_train, n_val) -> None:
    amp_dtype = autocast_dtype(context.device, enabled=not args.no_amp)
    print("=" * 72)
    print("3D Improved UNet training")
    for key, value in plain_config(args).items():
        print(f"  {key:<18} {value}")
    print(f"  {'running on':<18} {context.device} x {context.world_size} process(es)")
    print(f"  {'precision':<18} {amp_dtype if amp_dtype else 'float32'}")
    every = "per epoch" if args.val_every <= 1 else f"every {args.val_every} epochs and after the last"
    print(f"  {'validation':<18} {every} on the preprocessed grid (overlap {args.overlap}); best.pt's final "
          f"validation on each volume's source grid (overlap {PREDICTION_OVERLAP}), as predict.py reports")
    print(f"  {'patients':<18} train {len(split['train'])} ({n_train} volumes), val {len(split['val'])} "
          f"({n_val} volumes), test {len(split['test'])}")
    print("=" * 72, flush=True)
    if context.device.type == "cpu" and args.patch_size is None and tuple(args.channels) == DEFAULT_CHANNELS:
        print("note: the default sizes (whole volumes, widths 32-64-128-256) are for a GPU; one epoch of them on the "
              "phantom took 632 s on a 2-core CPU. On a CPU use the README's demo settings (--spatial-size 96 96 48 "
              "--patch-size 64 64 32 --channels 16 32 64 128 --lr 3e-3 --epochs 12 --steps-per-epoch 25 --val-every 6 "
              "--warmup-steps 25 --deep-supervision: 300 steps of 64 x 64 x 32 crops; see docs/training.md).",
              flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
