"""Patient-specific adaptation: a trained model fine-tuned on one patient's reference scans and
their approved contours (the planning scan, week 0), then used on that patient's later scans.

The fine-tuning runs ``training.Trainer.step``, the step train.py takes (loss, class weights,
precision, augmentation, gradient clipping, the non-finite guard), on the parent's preprocessing;
every figure comes from ``segmenter.Segmenter.evaluate``, predict.py's evaluation of a volume.
adapt.py is the command line over this module; gpu_check.py times ``fine_tune`` on a GPU.

How long to fine-tune, at which learning rate and with or without augmentation is chosen on the
parent run's validation patients (``choose_settings``): each validation patient with two or more
weeks is adapted on its first week and scored on its later weeks, for every setting of a small
grid, and the setting with the best mean foreground Dice wins. Test patients never enter it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset

from pelvicseg.checkpoint import load_checkpoint
from dataset import Case, DeviceAugmentation, augmentation, cached_dataset
from pelvicseg.inference import Member, autocast_dtype, checkpoint_path, load_members, load_source
from pelvicseg.metrics import nan_mean
from modules import ImprovedUNet3D
from pelvicseg.segmenter import Segmenter
from pelvicseg.errors import TrainingDiverged
from pelvicseg.training import (Trainer, epoch_seed, make_loss, seed_random_generators,
                      training_loader)

SETTINGS_FILE = "adaptation.json"  # in the parent run: the setting chosen on its validation patients
# Without adaptation.json. Steps and rate were set from run_protocol on one validation patient of
# the phantom's demo model (004, adapted on week 0, weeks 0-2 scored): at 1e-3, 30 and 60 steps
# first lowered the later weeks' Dice (Adam's first steps move every weight by about the rate,
# whatever its gradient) and 120 steps raised it above the parent's (mean foreground 0.812 ->
# 0.865); 3e-4 rose more slowly (0.838 at 120); 1e-5 and 3e-5 only lowered it over 40 steps.
# Augmentation off: `adapt.py --choose-on-validation runs/demo` on both validation patients (004,
# 013; later weeks' mean foreground Dice) put crops alone above the training augmentation at every
# step count and rate of its grid (120 steps at 1e-3: 0.883 against 0.861; the parent 0.816). The
# later weeks are the same anatomy as the reference scan, so the augmentation's invented variety
# only spends steps.
DEFAULT_SETTINGS = {"steps": 120, "lr": 1e-3, "augment": False}
# The grid --choose-on-validation scores. The step counts are milestones of one fine-tuning per
# (lr, augment), so the grid costs max(steps) steps per (patient, lr, augment), not their sum.
GRID_STEPS = (0, 40, 80, 120)
GRID_LR = (3e-4, 1e-3)
GRID_AUGMENT = (True, False)


@dataclass
class Parent:
    """The trained model adapted from: its ensemble member (weights, config, run folder) and
    the whole checkpoint, whose fields the adapted checkpoint keeps."""
    member: Member
    state: dict

    @property
    def path(self) -> Path:
        return Path(self.member.path)

    @property
    def class_names(self) -> list[str]:
        return list(self.member.config["class_names"])


def load_parent(path: str | Path) -> Parent:
    """A checkpoint file or a run folder (its best.pt)."""
    file = checkpoint_path(path)
    member = load_members([file])[0]
    return Parent(member, load_checkpoint(file))


def settings_for(parent_run: Path, overrides: dict) -> tuple[dict, str]:
    """The fine-tuning setting: the run's adaptation.json where it exists, else the defaults; any
    flag given on the command line replaces its entry. Returns (setting, where it came from)."""
    chosen_file = parent_run / SETTINGS_FILE
    if chosen_file.exists():
        settings, source = dict(json.loads(chosen_file.read_text())["chosen"]), f"chosen on validation ({chosen_file})"
    else:
        settings, source = dict(DEFAULT_SETTINGS), f"defaults (no {chosen_file})"
    given = {key: value for key, value in overrides.items() if value is not None}
    if given:
        source += "; given: " + ", ".join(f"{k} {v}" for k, v in given.items())
    settings.update(given)
    return settings, source


# ----------------------------------------------------------------------------- fine-tuning

def reference_data(parent: Parent, cases: Sequence[Case], augment: bool) -> Dataset:
    """The reference scans preprocessed as the parent's training data (its spacing, its crops
    centred on each class in turn), with the loader half of its augmentation; the device half is
    ``fine_tune``'s. Labels with a class the parent does not know are refused by the loader."""
    config = parent.member.config
    num_classes = len(parent.class_names)
    patch_size = config.get("patch_size")
    cache = cached_dataset(cases, config["spacing"], num_classes, crop_indices=patch_size is not None)
    on_device = config.get("augment", "device") == "device" or not augment
    return Dataset(cache, transform=augmentation(patch_size, num_classes, [0.5] + [1.0] * (num_classes - 1),
                                                 spatial_on_device=on_device))


def fine_tune(parent: Parent, cases: Sequence[Case], settings: dict, device: torch.device, seed: int = 0,
              milestones: Sequence[int] = (), on_milestone: Callable[[int, dict], None] | None = None,
              data: Dataset | None = None) -> tuple[dict, float]:
    """``settings["steps"]`` training steps on ``cases`` from the parent's weights, Adam at a
    constant ``settings["lr"]``. At each step count in ``milestones`` (above 0) ``on_milestone(step, weights)``
    gets a CPU copy of the weights. Returns the final weights on the CPU and the seconds of
    training (the milestones' own time left out)."""
    started = time.perf_counter()  # the reference scans' preprocessing counts, when it is done here
    config = parent.member.config
    model = ImprovedUNet3D(**parent.member.model_args)
    model.load_state_dict(parent.member.weights)
    model.to(device).train()
    amp_dtype = autocast_dtype(device, enabled=not config.get("no_amp", False))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=config.get("weight_decay", 0.0))
    class_weights = torch.as_tensor(parent.state.get("class_weights") or [1.0] * len(parent.class_names),
                                    dtype=torch.float32, device=device)
    trainer = Trainer(model, optimizer, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                      make_loss(config.get("loss", "combined"), class_weights,
                                config.get("class_weighting", "ce-dice")), config.get("loss", "combined"),
                      amp_dtype)
    augment = bool(settings["augment"])
    device_augmentation = DeviceAugmentation() if augment and config.get("augment", "device") == "device" else None
    data = data if data is not None else reference_data(parent, cases, augment)
    step, seconds = 0, 0.0
    for repeat in range(math.ceil(settings["steps"] / max(len(data), 1))):
        generator_seed = epoch_seed(seed, repeat + 1)
        seed_random_generators(generator_seed)
        generator = torch.Generator(device).manual_seed(generator_seed)
        for batch in training_loader(data, 1, 0, generator_seed):
            images = batch["image"].to(device).as_tensor()
            labels = batch["label"].to(device).as_tensor()
            if device_augmentation is not None:
                images, labels = device_augmentation(images, labels, generator)
            trainer.step(images, labels)
            if trainer.diverged:
                raise TrainingDiverged(f"adaptation: {trainer.nonfinite_in_a_row} steps in a row had a non-finite loss "
                                       f"or gradient at lr {settings['lr']:.3g}; try a lower --lr")
            step += 1
            if step in milestones and on_milestone is not None:
                seconds += time.perf_counter() - started
                model.eval()
                on_milestone(step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                model.train()
                started = time.perf_counter()
            if step >= settings["steps"]:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds += time.perf_counter() - started
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, seconds


def adapted_member(parent: Parent, weights: dict, name: str = "adapted") -> Member:
    """The parent's member with other weights: the same preprocessing, classes, post-processing
    decision and review rule (its run folder is the parent's)."""
    return replace(parent.member, path=f"{parent.member.path} ({name})", weights=weights)


@dataclass
class Scan:
    """A labelled case preprocessed once with the parent's preprocessing, with its labels on its
    own grid: evaluated by many models (the parent, every milestone) without reading it again."""
    case: Case
    item: dict
    source: object
    target: np.ndarray


def prepared(parent: Parent, cases: Sequence[Case]) -> list[Scan]:
    segmenter = Segmenter([parent.member], "cpu")
    return [Scan(case, *segmenter.prepare(case.image), load_source(case.label)[0].astype(np.int64)) for case in cases]


def evaluate_cases(member: Member, scans: Sequence[Scan], device: torch.device, hd95: bool = True) -> list[dict]:
    """Each scan through ``Segmenter.evaluate_prepared``, as predict.py evaluates a case: per-class
    Dice (and HD95) on the case's own grid with the parent run's post-processing."""
    segmenter = Segmenter([member], device)
    records = []
    for scan in scans:
        result = segmenter.evaluate_prepared(scan.item, scan.source, scan.target, hd95=hd95)
        records.append({"case": scan.case.case_id, "patient": scan.case.patient, "week": scan.case.week,
                        "dice": [float(d) for d in result["dice"]],
                        "hd95": [float(h) for h in result["hd95"]] if hd95 else None})
    return records


def mean_foreground(records: Sequence[dict], key: str = "dice") -> float:
    values = np.array([r[key] for r in records], dtype=float)[:, 1:]
    return nan_mean(np.array([nan_mean(row) for row in values]))


def per_class_means(records: Sequence[dict], key: str, num_classes: int) -> list[float]:
    values = np.array([r[key] for r in records], dtype=float).reshape(-1, num_classes)
    return [nan_mean(values[:, c]) for c in range(num_classes)]


# ----------------------------------------------------------------------------- the protocol

def patients_with_weeks(cases: Sequence[Case], patients: Sequence[str]) -> dict[str, list[Case]]:
    """The labelled cases of each patient with two or more labelled weeks, in week order."""
    grouped: dict[str, list[Case]] = {}
    for case in sorted(cases, key=lambda c: (c.patient, c.week)):
        if case.patient in patients and case.label is not None:
            grouped.setdefault(case.patient, []).append(case)
    return {p: weeks for p, weeks in grouped.items() if len(weeks) >= 2}


def run_protocol(parent: Parent, patients: dict[str, list[Case]], grid: Sequence[dict], milestones: Sequence[int],
                 device: torch.device, seed: int = 0, hd95: bool = False,
                 report: Callable[[str], None] = print) -> dict:
    """Adapt on each patient's first week and score the later weeks, for every (lr, augment) in
    ``grid`` at every step count in ``milestones`` (0: the parent itself, scored once per
    patient). Returns the records (one per later week and setting) and the training seconds of
    each adaptation to ``max(milestones)`` steps."""
    records, seconds = [], []
    most = max(milestones)
    for patient, weeks in patients.items():
        reference, later = weeks[0], prepared(parent, weeks[1:])
        parent_records = evaluate_cases(parent.member, later, device, hd95)
        records += [{**r, "steps": 0, "lr": None, "augment": None} for r in parent_records]
        data = {augment: reference_data(parent, [reference], augment) for augment in {g["augment"] for g in grid}}
        for setting in grid:
            def scored(step: int, weights: dict, setting=setting) -> None:
                member = adapted_member(parent, weights)
                records.extend({**r, "steps": step, **setting} for r in evaluate_cases(member, later, device, hd95))
            _, taken = fine_tune(parent, [reference], {**setting, "steps": most}, device, seed, milestones, scored,
                                 data[setting["augment"]])
            seconds.append(taken)
            mine = [r for r in records if r["patient"] == patient and r["lr"] == setting["lr"]
                    and r["augment"] == setting["augment"]]
            after = ", ".join(f"{mean_foreground([r for r in mine if r['steps'] == s]):.3f} after {s}"
                              for s in milestones if s > 0)
            report(f"  patient {patient}: adapted on week {reference.week} (lr {setting['lr']:g}, augment "
                   f"{setting['augment']}), {most} steps in {taken:.1f} s; later weeks' mean foreground Dice "
                   f"{mean_foreground(parent_records):.3f} (parent), {after}")
    return {"records": records, "seconds": seconds}


def setting_key(record: dict) -> tuple:
    return (record["steps"], record["lr"], record["augment"])


def table_of(records: Sequence[dict], num_classes: int) -> list[dict]:
    """Per setting: mean foreground Dice over all scored weeks, and per-class means."""
    rows = []
    for key in sorted({setting_key(r) for r in records}, key=lambda k: (k[0], k[1] or 0, str(k[2]))):
        chosen = [r for r in records if setting_key(r) == key]
        rows.append({"steps": key[0], "lr": key[1], "augment": key[2], "weeks": len(chosen),
                     "mean_fg_dice": mean_foreground(chosen), "dice": per_class_means(chosen, "dice", num_classes)})
    return rows


def choose_from(table: Sequence[dict]) -> dict:
    """The best mean foreground Dice; among equals (to 1e-4) the fewest steps, then the lowest rate."""
    best = max(row["mean_fg_dice"] for row in table if math.isfinite(row["mean_fg_dice"]))
    near = [row for row in table if row["mean_fg_dice"] >= best - 1e-4]
    row = min(near, key=lambda r: (r["steps"], r["lr"] or 0))
    if row["steps"] == 0:
        return {"steps": 0, "lr": DEFAULT_SETTINGS["lr"], "augment": DEFAULT_SETTINGS["augment"]}
    return {"steps": row["steps"], "lr": row["lr"], "augment": row["augment"]}


def grid_of(lrs: Sequence[float], augments: Sequence[bool]) -> list[dict]:
    return [{"lr": float(lr), "augment": bool(augment)} for lr in lrs for augment in augments]
