"""Patient-specific adaptation: a trained model fine-tuned on one patient's reference scans and
their approved contours (the planning scan, week 0), then used on that patient's later scans.

The fine-tuning runs ``training.Trainer.step``, the step train.py takes (loss, class weights,
precision, augmentation, gradient clipping, the non-finite guard), on the parent's preprocessing;
every figure comes from ``segmenter.Segmenter.evaluate``, predict.py's evaluation of a volume.
adapt.py is the command line over this module; gpu_check.py times ``fine_tune`` on a GPU.

How long to fine-tune, at which learning rate and with or without augmentation is chosen on the
parent run's validation patients (``choose_from``): each validation patient with two or more
weeks is adapted on its first week and scored on its later weeks, for every setting of a small
grid. The setting with the best mean gain over the parent wins among those where no organ loses
more than ``MAX_ORGAN_LOSS``; an organ that loses more in every setting, or does not gain in the
chosen one, stays the parent's. Test patients never enter it. The same later weeks fit the guard
(``guard.fit_thresholds``) that every prediction of the adapted model runs against its parent.

The settings beside steps, rate and augmentation keep the adapted model near its parent:
``trainable`` ("all", "decoder": the encoder frozen, "norm_head": only the normalisation layers and
the output head), ``l2sp`` (a penalty on the squared distance to the parent's weights, Li et al.
2018, "Explicit inductive bias for transfer learning", L2-SP) and ``replay`` (that many of the
parent's training scans mixed into the patient's crops).
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
from torch.utils.data import ConcatDataset

from pelvicseg.checkpoint import load_checkpoint
from pelvicseg.guard import fit_thresholds
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
DEFAULT_SETTINGS = {"steps": 120, "lr": 1e-3, "augment": False, "trainable": "all", "l2sp": 0.0, "replay": 0}
# The constraint of the choice: no organ's mean Dice over the later weeks may fall by more than this.
MAX_ORGAN_LOSS = 0.01
TRAINABLE = ("all", "decoder", "norm_head")
# Without adaptation.json the guard has no fitted thresholds; these catch only gross collapses
# (a third of the parent's volume or three times it, 2 cm away, a tenth of the overlap).
DEFAULT_GUARD = {"min_overlap": 0.1, "max_volume_ratio": 3.0, "max_centroid_mm": 20.0, "scans": 0}
# The grid --choose-on-validation scores. The step counts are milestones of one fine-tuning per
# (lr, augment), so the grid costs max(steps) steps per (patient, lr, augment), not their sum.
GRID_STEPS = (0, 40, 80, 120)
GRID_LR = (3e-4, 1e-3)
GRID_AUGMENT = (True, False)
# augment "wide": the parent's augmentation with the ranges week-to-week change needs. A bladder
# fills to between half and twice its volume from one week to the next, and the rectum's gas
# comes and goes: local deformations of about a centimetre (4 voxels at the demo's 4.5 mm), on
# most crops, and a wider global scale for set-up and habitus changes.
WIDE_AUGMENTATION = {"scale_range": 0.2, "elastic_prob": 0.8, "elastic_magnitude": 4.0, "spatial_prob": 0.8}
AUGMENT_NAMES = {False: "off", True: "on", "wide": "wide"}
AUGMENT_VALUES = {name: value for value, name in AUGMENT_NAMES.items()}


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
        chosen = json.loads(chosen_file.read_text())["chosen"]
        settings = {**DEFAULT_SETTINGS, **{k: v for k, v in chosen.items() if k in DEFAULT_SETTINGS}}
        source = f"chosen on validation ({chosen_file})"
    else:
        settings, source = dict(DEFAULT_SETTINGS), f"defaults (no {chosen_file})"
    given = {key: value for key, value in overrides.items() if value is not None}
    if given:
        source += "; given: " + ", ".join(f"{k} {v}" for k, v in given.items())
    settings.update(given)
    return settings, source


def decision_for(parent_run: Path, class_names: Sequence[str]) -> tuple[dict, dict, str]:
    """Per organ "adapted" or "parent", and the guard's thresholds per organ: the run's
    adaptation.json where it records them, else every organ adapted under ``DEFAULT_GUARD``.
    Returns (organs, thresholds, where they came from)."""
    chosen_file = parent_run / SETTINGS_FILE
    chosen = json.loads(chosen_file.read_text()) if chosen_file.exists() else {}
    organs = {name: "adapted" for name in class_names[1:]}
    if chosen.get("organs"):
        organs.update(chosen["organs"])
        source = f"chosen on validation ({chosen_file})"
    else:
        source = f"defaults (no per-organ decision in {chosen_file})"
    thresholds = chosen.get("guard") or {name: dict(DEFAULT_GUARD) for name in class_names[1:]}
    return organs, thresholds, source


# ----------------------------------------------------------------------------- fine-tuning

def reference_data(parent: Parent, cases: Sequence[Case], augment: bool | str) -> Dataset:
    """The reference scans preprocessed as the parent's training data (its spacing, its crops
    centred on each class in turn), with the loader half of its augmentation; the device half is
    ``fine_tune``'s. Labels with a class the parent does not know are refused by the loader."""
    config = parent.member.config
    num_classes = len(parent.class_names)
    patch_size = config.get("patch_size")
    cache = cached_dataset(cases, config["spacing"], num_classes, crop_indices=patch_size is not None)
    # the spatial half on the device: as the parent trained, or always for crops alone and "wide"
    on_device = config.get("augment", "device") == "device" or augment is not True
    return Dataset(cache, transform=augmentation(patch_size, num_classes, [0.5] + [1.0] * (num_classes - 1),
                                                 spatial_on_device=on_device))


def fine_tune(parent: Parent, cases: Sequence[Case], settings: dict, device: torch.device, seed: int = 0,
              milestones: Sequence[int] = (), on_milestone: Callable[[int, dict], None] | None = None,
              data: Dataset | None = None, replay: Sequence[Case] = ()) -> tuple[dict, float]:
    """``settings["steps"]`` training steps on ``cases`` from the parent's weights, Adam at a
    constant ``settings["lr"]``, on the parameters ``settings["trainable"]`` names, with the L2-SP
    penalty ``settings["l2sp"]`` and the scans ``replay`` (the parent's training scans) mixed into
    the crops. At each step count in ``milestones`` (above 0) ``on_milestone(step, weights)``
    gets a CPU copy of the weights. Returns the final weights on the CPU and the seconds of
    training (the milestones' own time left out)."""
    started = time.perf_counter()  # the reference scans' preprocessing counts, when it is done here
    config = parent.member.config
    model = ImprovedUNet3D(**parent.member.model_args)
    model.load_state_dict(parent.member.weights)
    model.to(device).train()
    trained = trainable_parameters(model, settings.get("trainable", "all"))
    amp_dtype = autocast_dtype(device, enabled=not config.get("no_amp", False))
    optimizer = torch.optim.Adam(trained, lr=settings["lr"], weight_decay=config.get("weight_decay", 0.0))
    class_weights = torch.as_tensor(parent.state.get("class_weights") or [1.0] * len(parent.class_names),
                                    dtype=torch.float32, device=device)
    loss = make_loss(config.get("loss", "combined"), class_weights, config.get("class_weighting", "ce-dice"))
    if settings.get("l2sp"):
        loss = L2SPLoss(loss, model, float(settings["l2sp"]))
    trainer = Trainer(model, optimizer, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                      loss, config.get("loss", "combined"), amp_dtype)
    augment = settings["augment"]
    device_augmentation = (DeviceAugmentation(**WIDE_AUGMENTATION) if augment == "wide" else
                           DeviceAugmentation() if augment and config.get("augment", "device") == "device" else None)
    data = data if data is not None else reference_data(parent, cases, augment)
    if replay:
        data = ConcatDataset([data, reference_data(parent, replay, augment)])
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


def trainable_parameters(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The parameters fine-tuned (the others frozen): "all"; "decoder" (the up path and the
    heads, the encoder and bottleneck frozen); "norm_head" (GroupNorm scales and shifts, and the heads)."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable {which!r}: one of {', '.join(TRAINABLE)}")
    norms = {name for name, module in model.named_modules() if isinstance(module, torch.nn.GroupNorm)}
    chosen = []
    for name, parameter in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        head = module.startswith(("head", "aux_head"))
        keep = (which == "all" or (which == "decoder" and (module.startswith("dec") or head))
                or (which == "norm_head" and (module in norms or head)))
        parameter.requires_grad_(keep)
        if keep:
            chosen.append(parameter)
    return chosen


class L2SPLoss(torch.nn.Module):
    """The training loss plus ``alpha`` times the squared distance of the trained weights to the
    parent's (L2-SP): the fine-tuning stays near the starting point. Wraps the loss that
    ``Trainer.step`` calls, so the step itself is training's."""

    def __init__(self, loss: torch.nn.Module, model: torch.nn.Module, alpha: float):
        super().__init__()
        self.loss, self.model, self.alpha = loss, [model], alpha  # a list: not registered as a submodule
        self.start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def forward(self, *args):
        penalty = sum(((p - self.start[name]) ** 2).sum() for name, p in self.model[0].named_parameters()
                      if name in self.start)
        return self.loss(*args) + self.alpha * penalty


def adapted_member(parent: Parent, weights: dict, name: str = "adapted") -> Member:
    """The parent's member with other weights: the same preprocessing, classes, post-processing
    decision and review rule (its run folder is the parent's)."""
    return replace(parent.member, path=f"{parent.member.path} ({name})", weights=weights)


@dataclass
class Scan:
    """A labelled case preprocessed once with the parent's preprocessing, with its labels on its
    own grid and, once computed, the parent's probabilities on it: evaluated by many models (the
    parent, every milestone) without reading it or running the parent again."""
    case: Case
    item: dict
    source: object
    target: np.ndarray
    parent_probabilities: torch.Tensor | None = None


def prepared(parent: Parent, cases: Sequence[Case]) -> list[Scan]:
    segmenter = Segmenter([parent.member], "cpu")
    return [Scan(case, *segmenter.prepare(case.image), load_source(case.label)[0].astype(np.int64)) for case in cases]


def evaluate_cases(member: Member, scans: Sequence[Scan], device: torch.device, hd95: bool = True,
                   parent: Member | None = None, organs: dict | None = None, thresholds: dict | None = None) -> list[dict]:
    """Each scan through ``Segmenter.evaluate_prepared``, as predict.py evaluates a case: per-class
    Dice (and HD95) on the case's own grid with the parent run's post-processing. With ``parent``
    the model is guarded by it as predict.py guards an adapted model (``organs``, ``thresholds``:
    ``guard.combine``'s; none: nothing falls back, the agreement is measured); the records then
    carry each organ's ``agreement`` with the parent and the guard's ``fallbacks``."""
    segmenter = Segmenter([member], device, guard=False, parent=parent, organs=organs, thresholds=thresholds)
    records = []
    for scan in scans:
        if parent is not None and scan.parent_probabilities is None:
            scan.parent_probabilities = segmenter.parent_probabilities(scan.item)
        result = segmenter.evaluate_prepared(scan.item, scan.source, scan.target, hd95=hd95,
                                             parent_probabilities=scan.parent_probabilities)
        records.append({"case": scan.case.case_id, "patient": scan.case.patient, "week": scan.case.week,
                        "dice": [float(d) for d in result["dice"]],
                        "hd95": [float(h) for h in result["hd95"]] if hd95 else None,
                        "agreement": result["agreement"], "fallbacks": result["fallbacks"]})
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


def replay_cases(cases: Sequence[Case], patients: Sequence[str], count: int, seed: int = 0) -> list[Case]:
    """``count`` labelled scans of ``patients`` (the parent's training patients), one per patient,
    drawn with ``seed``: the parent's data replayed among the patient's crops."""
    if count <= 0:
        return []
    first: dict[str, Case] = {}
    for case in sorted((c for c in cases if c.patient in patients and c.label is not None),
                       key=lambda c: (c.patient, c.week)):
        first.setdefault(case.patient, case)
    pool = sorted(first)
    if not pool:
        raise ValueError("replay: none of the parent's training patients has a labelled scan here")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [first[pool[i]] for i in sorted(chosen)]


def describe(setting: dict) -> str:
    extra = [f"{k} {setting[k]}" for k in ("trainable", "l2sp", "replay")
             if k in setting and setting[k] != DEFAULT_SETTINGS[k]]
    return ", ".join([f"lr {setting['lr']:g}", f"augment {AUGMENT_NAMES[setting['augment']]}"] + extra)


def run_protocol(parent: Parent, patients: dict[str, list[Case]], grid: Sequence[dict], milestones: Sequence[int],
                 device: torch.device, seed: int = 0, hd95: bool = False,
                 report: Callable[[str], None] = print, replay: Sequence[Case] = (),
                 organs: dict | None = None, thresholds: dict | None = None) -> dict:
    """Adapt on each patient's first week and score the later weeks, for every setting in ``grid``
    (lr, augment, and optionally trainable, l2sp, replay) at every step count in ``milestones``
    (0: the parent itself, scored once per patient). Every adapted model is evaluated guarded by
    the parent with ``organs`` and ``thresholds`` (None: nothing falls back; its records then give
    the agreement the guard is fitted on). ``replay``: the parent's training scans, the first
    ``setting["replay"]`` of which join the crops. Returns the records (one per later week and
    setting) and the training seconds of each adaptation to ``max(milestones)`` steps."""
    records, seconds = [], []
    most = max(milestones)
    for patient, weeks in patients.items():
        reference, later = weeks[0], prepared(parent, weeks[1:])
        parent_records = evaluate_cases(parent.member, later, device, hd95)
        records += [{**r, "steps": 0, **{k: None for k in grid[0]}} for r in parent_records]
        data = {}
        for setting in grid:
            key = (setting["augment"], setting.get("replay", 0))
            if key not in data:
                data[key] = reference_data(parent, [reference], setting["augment"])
                if key[1]:
                    data[key] = ConcatDataset([data[key], reference_data(parent, list(replay)[:key[1]],
                                                                         setting["augment"])])

            def scored(step: int, weights: dict, setting=setting) -> None:
                member = adapted_member(parent, weights)
                records.extend({**r, "steps": step, **setting}
                               for r in evaluate_cases(member, later, device, hd95, parent.member, organs, thresholds))
            _, taken = fine_tune(parent, [reference], {**setting, "steps": most}, device, seed, milestones, scored,
                                 data[key])
            seconds.append(taken)
            mine = [r for r in records if r["patient"] == patient and r["steps"] > 0
                    and all(r.get(k) == v for k, v in setting.items())]
            after = ", ".join(f"{mean_foreground([r for r in mine if r['steps'] == s]):.3f} after {s}"
                              for s in milestones if s > 0)
            report(f"  patient {patient}: adapted on week {reference.week} ({describe(setting)}), {most} steps in "
                   f"{taken:.1f} s; later weeks' mean foreground Dice {mean_foreground(parent_records):.3f} (parent), "
                   f"{after}")
    return {"records": records, "seconds": seconds}


SETTING_KEYS = ("lr", "augment", "trainable", "l2sp", "replay")


def setting_key(record: dict) -> tuple:
    return (record["steps"],) + tuple(record.get(k) for k in SETTING_KEYS)


def table_of(records: Sequence[dict], num_classes: int) -> list[dict]:
    """Per setting: mean foreground Dice over all scored weeks, and per-class means."""
    rows = []
    for key in sorted({setting_key(r) for r in records},
                      key=lambda k: (k[0],) + tuple("" if v is None else str(v) for v in k[1:])):
        chosen = [r for r in records if setting_key(r) == key]
        rows.append({"steps": key[0], **dict(zip(SETTING_KEYS, key[1:])), "weeks": len(chosen),
                     "mean_fg_dice": mean_foreground(chosen), "dice": per_class_means(chosen, "dice", num_classes)})
    return rows


def gains(row: dict, parent_row: dict) -> np.ndarray:
    """Per organ: the row's mean Dice minus the parent's (NaN where either is NaN)."""
    return np.asarray(row["dice"], dtype=float)[1:] - np.asarray(parent_row["dice"], dtype=float)[1:]


def choose_from(table: Sequence[dict], class_names: Sequence[str], max_loss: float = MAX_ORGAN_LOSS) -> dict:
    """The constrained choice on the later weeks' per-organ mean Dice (``table_of``'s rows; the
    row of 0 steps is the parent).

    1. An organ that loses more than ``max_loss`` in every adapted setting keeps the parent's
       prediction ("parent"); it counts as a gain of 0 below.
    2. Among the settings where no other organ loses more than ``max_loss``, the best mean gain over
       the organs wins (the parent itself, gain 0, always qualifies); among equals (to 1e-4) the
       fewest steps, then the lowest rate.
    3. In the winning setting, an organ that does not gain (gain <= 0) keeps the parent's
       prediction too: adapting it would add the risk of a loss on a new patient and nothing
       expected in return. Two validation patients measure a gain to about a hundredth, so a
       loss of 0.001 there is a loss of up to 0.01 or more on the next patients.
       Organs are "adapted" unless kept by step 1 or 3; a kept organ counts as a gain of 0.

    Returns ``{"steps", "lr", "augment", ..., "organs": {name: "adapted" | "parent"},
    "gain": {name: gain}, "mean_gain"}``; a winner of 0 steps has every organ "parent"."""
    organs = list(class_names[1:])
    parent_row = next(row for row in table if row["steps"] == 0)
    adapted_rows = [row for row in table if row["steps"] > 0]
    losses = {row_index: gains(row, parent_row) for row_index, row in enumerate(adapted_rows)}
    kept = [name for o, name in enumerate(organs)
            if adapted_rows and all(not (g[o] >= -max_loss) for g in losses.values())]  # NaN counts as a loss
    if not adapted_rows:
        kept = organs
    free = [o for o, name in enumerate(organs) if name not in kept]
    candidates = [(0.0, parent_row, np.zeros(len(organs)))]
    for index, row in enumerate(adapted_rows):
        gain = losses[index].copy()
        gain[[o for o, name in enumerate(organs) if name in kept]] = 0.0
        if all(gain[o] >= -max_loss for o in free) and np.all(np.isfinite(gain)):
            candidates.append((float(np.mean(gain)), row, gain))
    best = max(c[0] for c in candidates)
    mean_gain, row, gain = min((c for c in candidates if c[0] >= best - 1e-4),
                               key=lambda c: (c[1]["steps"], c[1]["lr"] or 0))
    if row["steps"] == 0:
        chosen = {**DEFAULT_SETTINGS, "steps": 0}
        decision = {name: "parent" for name in organs}
    else:
        chosen = {"steps": row["steps"], **{k: row[k] for k in SETTING_KEYS}}
        kept += [name for o, name in enumerate(organs) if name not in kept and not gain[o] > 0]
        gain = np.where([name in kept for name in organs], 0.0, gain)
        mean_gain = float(np.mean(gain))
        decision = {name: "parent" if name in kept else "adapted" for name in organs}
    return {**chosen, "organs": decision, "gain": dict(zip(organs, (float(g) for g in gain))),
            "mean_gain": mean_gain}


def guard_thresholds(records: Sequence[dict], chosen: dict, class_names: Sequence[str]) -> dict:
    """The guard fitted on the chosen setting's later weeks (their agreement with the parent)."""
    mine = [r for r in records if r["steps"] == chosen["steps"] and r["steps"] > 0
            and all(r.get(k) == chosen.get(k) for k in SETTING_KEYS)]
    if not mine:
        return {name: {**DEFAULT_GUARD} for name in class_names[1:]}
    return fit_thresholds([r["agreement"] for r in mine], class_names)


def grid_of(lrs: Sequence[float], augments: Sequence[bool | str], trainables: Sequence[str] = ("all",),
            l2sps: Sequence[float] = (0.0,), replays: Sequence[int] = (0,)) -> list[dict]:
    return [{"lr": float(lr), "augment": augment if augment == "wide" else bool(augment), "trainable": trainable,
             "l2sp": float(l2sp), "replay": int(replay)}
            for lr in lrs for augment in augments for trainable in trainables for l2sp in l2sps for replay in replays]


def per_week_table(records: Sequence[dict], class_names: Sequence[str], steps: int) -> dict:
    """Per organ and per later week (the scan's week number): parent and
    delivered mean Dice over the patients, the change, and each organ's worst week."""
    table = {}
    weeks = sorted({r["week"] for r in records})
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        rows = {}
        for week in weeks:
            before = [r["dice"][c] for r in records if r["steps"] == 0 and r["week"] == week]
            after = [r["dice"][c] for r in records if r["steps"] == steps and r["week"] == week]
            parent_mean, adapted_mean = nan_mean(np.array(before, float)), nan_mean(np.array(after, float))
            rows[str(week)] = {"parent": parent_mean, "adapted": adapted_mean, "change": adapted_mean - parent_mean}
        finite = {w: v for w, v in rows.items() if math.isfinite(v["change"])}
        worst = min(finite, key=lambda w: finite[w]["change"]) if finite else None
        table[name] = {"weeks": rows, "worst_week": None if worst is None else int(worst),
                       "worst_change": None if worst is None else finite[worst]["change"]}
    return table
