"""Train the 3D Improved UNet on HipMRI-layout data (or, without --data-root, on the phantom).

    python train.py --out runs/demo                       # one process, CPU or one GPU
    torchrun --nproc_per_node=4 train.py --out runs/ddp   # DistributedDataParallel

RUN_DIR receives config.json, splits.json, metrics.csv, training_curves.png, last.pt (every
epoch) and best.pt (best validation mean foreground Dice). --resume continues from last.pt.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss, DiceLoss
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from checkpoint import load_checkpoint, save_checkpoint
from dataset import (CLASS_NAMES, DataError, DeviceAugmentation, augmentation, cached_dataset, cases_in, class_voxel_counts,
                     class_weights_from_counts, find_cases, load_or_make_split)
from modules import ImprovedUNet3D, count_parameters
from predict import (autocast_dtype, dice_from_counts, dice_per_class, nan_mean, overlap_counts,
                     predict_probabilities, resolve_device, run_cli)

DEFAULT_PHANTOM = Path("data/phantom")
MEMORY_FLAGS = ("--patch-size (smaller crops), --spatial-size, --channels (narrower network), "
                "--checkpointing, --batch-size 1")


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the 3D Improved UNet for pelvic MRI segmentation.")
    parser.add_argument("--data-root", help="HipMRI-layout folder; without it the phantom in data/phantom/ "
                        "is generated once and used")
    parser.add_argument("--out", default="runs/default", help="run folder for checkpoints, metrics and curves")
    parser.add_argument("--epochs", type=int, default=40, help="maximum number of epochs")
    parser.add_argument("--batch-size", type=int, default=1, help="volumes per step and process")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine-decayed)")
    parser.add_argument("--weight-decay", type=float, default=1e-5, help="Adam L2 weight decay")
    parser.add_argument("--loss", choices=("ce", "dice", "combined"), default="combined",
                        help="class-weighted cross-entropy, Dice, or both summed (MONAI DiceCELoss)")
    parser.add_argument("--spatial-size", type=int, nargs=3, default=(128, 128, 64), metavar=("X", "Y", "Z"),
                        help="common size volumes are resampled to, in the stored array order "
                        "(128 128 64 halves a 256 x 256 x 128 HipMRI volume)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="random training crop and sliding-window size (default: --spatial-size)")
    parser.add_argument("--channels", type=int, nargs=4, default=(32, 64, 128, 256),
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
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in validation")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many epochs without a better validation mean foreground Dice")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, weights and augmentation")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--no-amp", action="store_true",
                        help="full float32 precision (default: bf16/fp16 autocast on CUDA, bf16 on CPUs with "
                        "native bf16)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data-loading worker processes")
    parser.add_argument("--class-names", nargs="+", default=list(CLASS_NAMES),
                        help="label names in label-value order; their number is the number of classes")
    parser.add_argument("--phantom-patients", type=int, default=10, help="patients in the default phantom")
    parser.add_argument("--phantom-weeks", type=int, default=3, help="weeks per patient in the default phantom")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- distributed

def setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); initialises the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world_size


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_lists(items: list) -> list:
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, items)
        return [x for part in gathered for x in part]
    return items


def check_replicas_identical(model: torch.nn.Module) -> str:
    """After DistributedDataParallel training every rank must hold the same weights (only rank 0's
    are saved). Each rank hashes its parameters and buffers (plus a float64 sum, readable in the
    message) and all ranks compare the gathered digests, so all raise together on a mismatch
    rather than one rank raising while the others wait at the next barrier."""
    digest = hashlib.sha256()
    total = 0.0
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())  # exact bytes, any dtype
        total += float(array.double().sum()) if array.is_floating_point() else 0.0
    mine = (digest.hexdigest(), total)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if any(g[0] != gathered[0][0] for g in gathered):
        raise RuntimeError("DDP check: weights differ between ranks (parameter sums "
                           + ", ".join(f"rank {r}: {g[1]:.17g}" for r, g in enumerate(gathered)) + ")")
    return f"DDP check: weights identical on {len(gathered)} ranks (parameter sum {total:.17g})"


# ----------------------------------------------------------------------------- pieces

def ensure_default_phantom(args: argparse.Namespace, is_main: bool) -> Path:
    """The embedded default data: generated once into data/phantom/, reused afterwards."""
    marker = DEFAULT_PHANTOM / "phantom.json"
    wanted = {"patients": args.phantom_patients, "weeks": args.phantom_weeks, "seed": 0}
    if is_main and (not marker.exists() or json.loads(marker.read_text()) != wanted):
        import phantom

        print(f"Generating the default phantom ({args.phantom_patients} patients x {args.phantom_weeks} weeks) "
              f"into {DEFAULT_PHANTOM}/ ...", flush=True)
        phantom.write_phantom(DEFAULT_PHANTOM, patients=args.phantom_patients, weeks=args.phantom_weeks, seed=0)
        marker.write_text(json.dumps(wanted))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return DEFAULT_PHANTOM


def make_loss(kind: str, class_weights: torch.Tensor) -> torch.nn.Module:
    """Class weights enter both terms: the cross-entropy's per-class weights and the Dice's
    per-class weighting (MONAI applies ``weight`` to each)."""
    if kind == "ce":
        return torch.nn.CrossEntropyLoss(weight=class_weights)
    if kind == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, weight=class_weights)
    return DiceCELoss(to_onehot_y=True, softmax=True, weight=class_weights)


def compute_loss(loss_fn, kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "ce":
        return loss_fn(logits, labels[:, 0].long())
    return loss_fn(logits, labels)


def deep_supervision_loss(loss_fn, kind, output, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, full-resolution logits). Lower decoder outputs are scored against nearest-downsampled
    labels with weights 1/2 and 1/4, normalised, as in nnU-Net."""
    if isinstance(output, torch.Tensor):
        return compute_loss(loss_fn, kind, output, labels), output
    logits, auxiliary = output
    total = compute_loss(loss_fn, kind, logits, labels)
    weight_sum = 1.0
    for level, aux in enumerate(auxiliary, start=1):
        weight = 0.5**level
        padded = torch.nn.functional.pad(labels, [p for s, a in zip(reversed(labels.shape[2:]),
                                                                    reversed(aux.shape[2:]))
                                                  for p in (0, a * 2**level - s)])
        small = torch.nn.functional.interpolate(padded, size=aux.shape[2:], mode="nearest")
        total = total + weight * compute_loss(loss_fn, kind, aux, small)
        weight_sum += weight
    return total / weight_sum, logits


def seed_everything(seed: int) -> None:
    set_determinism(seed=seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_metrics_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """On resume, drop rows of epochs after the checkpoint (an interrupted epoch's row, if any)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["epoch"]) <= last_epoch)


def plain_config(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


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
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step.", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------- epochs

def train_one_epoch(model, loader, optimizer, scaler, loss_fn, args, device, amp_dtype, num_classes,
                    stop: StopRequest, show_progress: bool, device_augmentation=None,
                    generator: torch.Generator | None = None) -> tuple[float, np.ndarray, bool]:
    """Returns (mean loss, per-class Dice on the training crops, completed)."""
    model.train()
    sums = torch.zeros(2 + 3 * num_classes, dtype=torch.float64)  # loss sum, steps, tp/fp/fn per class
    progress = tqdm(loader, desc="train", leave=False, disable=not show_progress, dynamic_ncols=True)
    for batch in progress:
        images = batch["image"].to(device, non_blocking=True).as_tensor()
        labels = batch["label"].to(device, non_blocking=True).as_tensor()
        # Gradients freed before the forward pass, not after it: one model's worth less at the peak.
        optimizer.zero_grad(set_to_none=True)
        if device_augmentation is not None:
            images, labels = device_augmentation(images, labels, generator)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(images)
        # The loss in float32: softmax and Dice sums of tiny organs lose precision in bf16.
        loss, logits = deep_supervision_loss(loss_fn, args.loss, _float(output), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            sums[2:] += torch.from_numpy(overlap_counts(logits.argmax(1), labels[:, 0], num_classes).reshape(-1))
        sums[0] += float(loss.detach())
        sums[1] += 1
        progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if stop.requested:
            return math.nan, np.full(num_classes, np.nan), False
    all_reduce_sum(sums)
    dice = dice_from_counts(sums[2:].numpy().reshape(num_classes, 3))
    return float(sums[0] / max(sums[1], 1)), dice, True


def _float(output):
    if isinstance(output, torch.Tensor):
        return output.float()
    return output[0].float(), [a.float() for a in output[1]]


def validate(model, val_dataset, rank, world_size, roi_size, loss_fn, args, device, amp_dtype,
             num_classes) -> tuple[float, np.ndarray]:
    """Whole-volume sliding-window inference (predict.py's code) and 3D Dice per class and volume;
    volumes are split over ranks and gathered. Returns (mean loss, mean Dice per class)."""
    model.eval()
    results = []
    for index in range(rank, len(val_dataset), world_size):
        item = val_dataset[index]
        image, label = item["image"][None], item["label"][None].to(device).as_tensor()
        probabilities = predict_probabilities(model, image, roi_size, args.overlap, False, amp_dtype)
        probabilities = torch.as_tensor(probabilities)
        with torch.no_grad():
            # The loss on probabilities turned back into log-space logits: the same objective as training.
            loss = compute_loss(loss_fn, args.loss, torch.log(probabilities.clamp_min(1e-8)), label)
        dice = dice_per_class(probabilities.argmax(1).cpu(), label.cpu(), num_classes)
        results.append((float(loss), dice.tolist()))
    results = gather_lists(results)
    losses = [r[0] for r in results]
    dice = np.array([r[1] for r in results], dtype=float).reshape(-1, num_classes)
    mean_dice = np.array([nan_mean(dice[:, c]) for c in range(num_classes)])
    return float(np.mean(losses)) if losses else math.nan, mean_dice


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict:
    rank, local_rank, world_size = setup_distributed()
    is_main = rank == 0
    device = resolve_device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    run_dir = Path(args.out)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if is_main and not args.resume and (last_path.exists() or best_path.exists()):
        raise DataError(f"{run_dir}: already holds a run (last.pt/best.pt); pass --resume to continue it "
                        "or choose another --out")
    resume_state = load_checkpoint(last_path) if args.resume else None
    if resume_state is not None:
        for key in ("spatial_size", "patch_size", "channels", "loss", "class_names", "deep_supervision"):
            if key in resume_state["config"]:
                setattr(args, key, resume_state["config"][key])
    args.patch_size = list(args.patch_size or args.spatial_size)
    if any(p > s for p, s in zip(args.patch_size, args.spatial_size)):
        raise DataError(f"--patch-size {args.patch_size} is larger than --spatial-size {args.spatial_size}")
    class_names = list(args.class_names)
    num_classes = len(class_names)

    data_root = Path(args.data_root) if args.data_root else ensure_default_phantom(args, is_main)
    args.data_root = str(data_root)
    cases = find_cases(data_root)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if world_size > 1:
        dist.barrier()
    split = load_or_make_split(cases, run_dir / "splits.json", args.seed) if is_main else None
    split = gather_lists([split])[0] if world_size > 1 else split
    train_cases, val_cases = cases_in(cases, split["train"]), cases_in(cases, split["val"])
    if not train_cases or not val_cases:
        raise DataError(f"{data_root}: the split leaves no training or no validation volumes")

    amp_dtype = autocast_dtype(device, enabled=not args.no_amp)
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if is_main:
        print_banner(args, device, amp_dtype, compile_model, world_size, split, len(train_cases), len(val_cases))
        (run_dir / "config.json").write_text(json.dumps(plain_config(args), indent=2) + "\n")

    seed_everything(args.seed)
    cache_workers = min(args.workers, 4) if args.workers > 0 else 1
    crops = list(args.patch_size) != list(args.spatial_size)
    train_cache = cached_dataset(train_cases, args.spatial_size, num_classes, cache_workers, progress=is_main,
                                 crop_indices=crops)
    val_cache = cached_dataset(val_cases, args.spatial_size, num_classes, cache_workers, progress=is_main)
    counts = class_voxel_counts(train_cache, num_classes)
    class_weights = torch.as_tensor(class_weights_from_counts(counts))
    if is_main:
        print("Class weights (training voxel counts): " + ", ".join(
            f"{n} {w:.2f}" for n, w in zip(class_names, class_weights.tolist())))
    # Crops centred on each foreground class equally often, background rarely: rare organs are seen.
    crop_ratios = [0.5] + [1.0] * (num_classes - 1)
    on_device = args.augment == "device"
    train_data = Dataset(train_cache, transform=augmentation(args.patch_size, num_classes, crop_ratios, on_device))
    device_augmentation = DeviceAugmentation() if on_device else None
    sampler = DistributedSampler(train_data, shuffle=True, seed=args.seed) if world_size > 1 else None

    model_args = {"in_channels": 1, "out_channels": num_classes, "channels": list(args.channels),
                  "dropout": args.dropout, "deep_supervision": args.deep_supervision,
                  "gradient_checkpointing": args.checkpointing}
    model = ImprovedUNet3D(**model_args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1), eta_min=args.lr * 0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = make_loss(args.loss, class_weights.to(device))

    start_epoch, best_metric, best_epoch, stale_epochs = 1, -math.inf, 0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scheduler.T_max = max(args.epochs, 1)  # resuming with more --epochs stretches the cosine, no restart
        scaler.load_state_dict(resume_state["scaler"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        start_epoch = int(resume_state["epoch"]) + 1
        best_metric, best_epoch = float(resume_state["best_metric"]), int(resume_state["best_epoch"])
        stale_epochs = int(resume_state["epochs_without_improvement"])
        if is_main:
            truncate_metrics(run_dir / "metrics.csv", start_epoch - 1)
            print(f"Resuming {last_path} after epoch {start_epoch - 1} (best {best_metric:.4f} at epoch {best_epoch})")
    if is_main:
        print(f"ImprovedUNet3D: {count_parameters(model):,} parameters")
    network = model
    if compile_model:
        for block in model.blocks():
            block.compile()  # regional: each block compiled once, reused for every call of its kind
    if world_size > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(epoch: int) -> dict:
        return {"model": model.state_dict(), "model_args": model_args, "config": plain_config(args),
                "class_names": class_names, "split": split, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "best_metric": best_metric, "best_epoch": best_epoch,
                "epochs_without_improvement": stale_epochs,
                "class_weights": class_weights.tolist(), "rng": {"torch": torch.get_rng_state()}}

    history_best = {"epoch": best_epoch, "mean_fg_dice": best_metric}
    stopped_early = interrupted = False
    with StopRequest() as stop:
        for epoch in range(start_epoch, args.epochs + 1):
            started = time.time()
            # Seeded from (seed, epoch): a resumed run draws the same augmentations and order.
            # Each rank draws its own crops and augmentations.
            epoch_seed = args.seed * 1000 + epoch + 7919 * rank
            seed_everything(epoch_seed)
            if sampler is not None:
                sampler.set_epoch(epoch)
            generator = torch.Generator().manual_seed(epoch_seed)
            loader = DataLoader(train_data, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                                num_workers=args.workers, generator=generator, drop_last=False,
                                pin_memory=device.type == "cuda", persistent_workers=False)
            try:
                train_loss, train_dice, completed = train_one_epoch(
                    network, loader, optimizer, scaler, loss_fn, args, device, amp_dtype, num_classes, stop,
                    show_progress=is_main and sys.stderr.isatty(), device_augmentation=device_augmentation,
                    generator=torch.Generator(device).manual_seed(epoch_seed))
            except torch.OutOfMemoryError:
                raise SystemExit(f"error: out of GPU memory at --patch-size {args.patch_size}; reduce memory "
                                 f"with {MEMORY_FLAGS}") from None
            if not completed:
                interrupted = True
                break
            val_loss, val_dice = validate(model, val_cache, rank, world_size, args.patch_size, loss_fn, args,
                                          device, amp_dtype, num_classes)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            mean_fg = nan_mean(val_dice[1:])
            improved = mean_fg > best_metric
            if improved:
                best_metric, best_epoch, stale_epochs = mean_fg, epoch, 0
            else:
                stale_epochs += 1
            seconds = time.time() - started
            if is_main:
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
                row.update({f"dice_{n}": val_dice[c] for c, n in enumerate(class_names)})
                row.update({"mean_fg_dice": mean_fg, "lr": lr, "seconds": seconds})
                row.update({f"train_dice_{n}": train_dice[c] for c, n in enumerate(class_names)})
                write_metrics_row(run_dir / "metrics.csv", {k: _fmt(v) for k, v in row.items()})
                state = checkpoint_state(epoch)
                save_checkpoint(state, last_path)
                if improved:
                    save_checkpoint(state, best_path)
                from figures import save_training_curves
                save_training_curves(run_dir / "metrics.csv", class_names, run_dir / "training_curves.png")
                print(f"epoch {epoch:3d}/{args.epochs}  loss {train_loss:.4f}/{val_loss:.4f}  dice "
                      + " ".join(f"{n[:4]} {d:.3f}" for n, d in zip(class_names[1:], val_dice[1:]))
                      + f"  fg {mean_fg:.4f}  lr {lr:.2e}  {seconds:.1f}s" + ("  best" if improved else ""),
                      flush=True)
            history_best = {"epoch": best_epoch, "mean_fg_dice": best_metric}
            if stale_epochs >= args.patience:
                stopped_early = True
                if is_main:
                    print(f"Early stopping: no better validation Dice for {args.patience} epochs.")
                break
            if stop.requested:
                interrupted = True
                break
    if is_main:
        if interrupted:
            print(f"Interrupted. {last_path} holds the last completed epoch; continue with --resume.")
        else:
            print(f"Done{' (early stop)' if stopped_early else ''}. Best validation mean foreground Dice "
                  f"{best_metric:.4f} at epoch {best_epoch}: {best_path}")
    if world_size > 1:
        message = check_replicas_identical(model)
        if is_main:
            print(message, flush=True)
        dist.barrier()
        dist.destroy_process_group()
    return history_best


def _fmt(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def print_banner(args, device, amp_dtype, compile_model, world_size, split, n_train, n_val) -> None:
    print("=" * 72)
    print("3D Improved UNet training")
    for key, value in plain_config(args).items():
        print(f"  {key:<18} {value}")
    print(f"  {'device':<18} {device} x {world_size} process(es)")
    print(f"  {'precision':<18} {amp_dtype if amp_dtype else 'float32'}")
    print(f"  {'compiled':<18} {compile_model}")
    print(f"  {'patients':<18} train {len(split['train'])} ({n_train} volumes), val {len(split['val'])} "
          f"({n_val} volumes), test {len(split['test'])}")
    print("=" * 72, flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
