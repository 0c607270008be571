"""The training step shared by every script that trains: the loss, the seeded training loader,
one optimisation step with mixed precision, and the guard against non-finite steps.

train.py runs epochs of these steps; nothing here parses flags or writes files.
"""

from __future__ import annotations

import math
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import DataLoader
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.losses import DiceCELoss, DiceLoss


# nnU-Net clips the gradient norm at 12: a rare spike (a crop of an organ edge at a high learning
# rate) then moves the weights no further than an ordinary step instead of throwing them off.
GRADIENT_CLIP_NORM = 12.0
# A few non-finite steps are skipped, as GradScaler skips fp16 overflows; this many in a row mean
# the weights themselves have diverged, and the run stops.
MAX_NONFINITE_STEPS_IN_A_ROW = 5


# ----------------------------------------------------------------------------- losses

def make_loss(kind: str, class_weights: torch.Tensor, weighting: str = "ce-dice") -> torch.nn.Module:
    """Class weights enter both terms (``weighting`` "ce-dice": the cross-entropy's per-class weights
    and the Dice's per-class weighting, as MONAI applies ``weight`` to each), the cross-entropy
    only ("ce"), or neither ("none")."""
    weights = None if weighting == "none" else class_weights
    if kind == "ce":
        return torch.nn.CrossEntropyLoss(weight=weights)
    if kind == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, weight=weights if weighting == "ce-dice" else None)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, weight=weights)
    if weighting == "ce":
        loss.dice = DiceLoss(to_onehot_y=True, softmax=True)
    return loss


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


def as_float32(output):
    """The network's output in float32: softmax and Dice sums of tiny organs lose precision in bf16."""
    if isinstance(output, torch.Tensor):
        return output.float()
    return output[0].float(), [a.float() for a in output[1]]


# ----------------------------------------------------------------------------- seeding and the loader

def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: a resumed run draws what the uninterrupted run drew, and
    each rank draws its own crops and augmentations."""
    return seed * 1000 + epoch + 7919 * rank


def seed_random_generators(seed: int) -> None:
    """Python's, NumPy's and torch's global generators. Unlike MONAI's set_determinism this leaves
    cuDNN's settings alone, so it can run every epoch without turning the autotuner off."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """A loader worker's start: MONAI's own worker hook first, which reseeds every random
    transform of the dataset from the seed torch gave this worker (base seed from the loader's
    generator + worker id, so it differs between workers and between epochs); then the worker
    leaves Ctrl-C and SIGTERM to the main process, so a scheduler that signals the whole process
    group (Slurm's scancel, kill -- -PGID) cannot kill it mid-step and turn the clean stop at the
    end of the step into a DataLoader traceback."""
    monai_worker_init_fn(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EpochSampler(torch.utils.data.Sampler):
    """The training volumes of one epoch of ``num_samples`` crops (nnU-Net's epoch: a fixed number
    of steps whatever the number of volumes): shuffled rounds of every volume, one after another,
    cut at ``num_samples``. Each volume is drawn as often as any other, give or take one, and a
    volume may give several crops (its random transforms differ each time). Seeded by ``seed``
    (``epoch_seed``: seed, epoch and rank), so a resumed run draws what the uninterrupted run
    drew, and under torchrun every rank draws its own sequence."""

    def __init__(self, num_volumes: int, num_samples: int, seed: int):
        if num_volumes < 1 or num_samples < 1:
            raise ValueError(f"EpochSampler: needs at least one volume and one sample, got {num_volumes} and "
                             f"{num_samples}")
        self.num_volumes, self.num_samples, self.seed = num_volumes, num_samples, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        indices: list[int] = []
        while len(indices) < self.num_samples:
            indices += torch.randperm(self.num_volumes, generator=generator).tolist()
        return iter(indices[:self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


# Adam decays with a cosine, SGD with nnU-Net's poly schedule: each optimiser with the decay it was tuned with.
SCHEDULES = {"adam": "cosine", "sgd": "poly"}


def make_optimizer(parameters, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, or nnU-Net's SGD (Nesterov momentum 0.99)."""
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                  decay: str = "cosine") -> float:
    """The learning rate of optimiser step ``step`` (0-based, counted over the whole run) of a run
    of ``total_steps``: a linear warm-up from ``base_lr / 100`` to ``base_lr`` over
    ``warmup_steps``, then a decay to the run's last step: a cosine down to ``base_lr / 100``, or
    nnU-Net's poly ``(1 - progress) ** 0.9`` towards 0.
    A closed form of the global step, so a resumed run continues exactly; a run resumed with more
    --epochs follows, from its next step on, the schedule a fresh run of that length would have."""
    minimum = base_lr * 0.01
    if step < warmup_steps:
        return minimum + (base_lr - minimum) * step / warmup_steps
    if decay == "poly":  # as nnU-Net: the last step's rate is small, not 0
        progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
        return base_lr * (1 - progress) ** 0.9
    progress = min(max((step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1), 0.0), 1.0)
    return minimum + (base_lr - minimum) * 0.5 * (1 + math.cos(math.pi * progress))


def training_loader(dataset, batch_size: int, workers: int, seed: int, sampler=None,
                    pin_memory: bool = False) -> DataLoader:
    """The loader of one epoch, seeded by ``seed`` (``epoch_seed``): its generator draws the order
    and every worker's seed, and without workers MONAI's DataLoader reseeds the transforms from it."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), drop_last=False, pin_memory=pin_memory,
                      persistent_workers=False, worker_init_fn=seed_worker)


# ----------------------------------------------------------------------------- one step

@dataclass
class StepResult:
    loss: float  # NaN for a skipped step
    logits: torch.Tensor
    skipped: bool


@dataclass
class Trainer:
    """What one optimisation step needs: the network (possibly DDP-wrapped), its optimizer and
    GradScaler, the loss, and the precision."""
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    loss_kind: str
    amp_dtype: torch.dtype | None
    nonfinite_in_a_row: int = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Forward, loss, backward and update of one batch.

        A step whose gradient norm is not finite is skipped (no update), as GradScaler does for
        fp16 overflows. The decision is taken on the gradients, which DistributedDataParallel has
        already averaged, so every rank skips the same steps and none waits for another.
        """
        device_type = images.device.type
        self.optimizer.zero_grad(set_to_none=True)  # before the forward pass: lower peak memory
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            output = self.network(images)
        loss, logits = deep_supervision_loss(self.loss_fn, self.loss_kind, as_float32(output), labels)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        gradient_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRADIENT_CLIP_NORM)
        loss_finite = bool(torch.isfinite(loss.detach()))
        if self.scaler.is_enabled():
            # fp16: GradScaler skips overflowing steps itself and lowers its scale; only a
            # non-finite loss (the forward pass itself) counts towards divergence.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = not loss_finite
        else:
            skipped = not bool(torch.isfinite(gradient_norm))
            if not skipped:
                self.optimizer.step()
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        return StepResult(float(loss.detach()) if not skipped else float("nan"), logits.detach(), skipped)

    @property
    def diverged(self) -> bool:
        return self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS_IN_A_ROW


def divergence_message(epoch: int, steps: int, amp_dtype: torch.dtype | None, lr: float, best_epoch: int) -> str:
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(amp_dtype, "float32")
    kept = (f"best.pt (epoch {best_epoch}) keeps the last finite model" if best_epoch
            else "no epoch finished with a finite validation, so there is no best.pt")
    return (f"epoch {epoch}: {steps} training steps in a row had a non-finite loss or gradient ({precision}, lr "
            f"{lr:.3g}); {kept}; try " + ("--no-amp or " if amp_dtype is not None else "") + "a lower --lr")


def parameters_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())

