"""Evaluation: per-class 3D Dice and HD95 per volume, misses, and the per-class summary.

Dice comes from summed true/false positives and negatives (as in nnU-Net): a class absent from
both ground truth and prediction is NaN and left out of means, never counted as 1.0.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from pelvicseg.atomic import atomic_open


def overlap_counts(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                   num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` true positives, false positives and false negatives per class; summed
    over volumes or batches they give a pooled Dice (training's per-epoch train Dice). One pass:
    the confusion matrix from a bincount of (truth, prediction) pairs, on the tensors' device."""
    prediction = torch.as_tensor(prediction).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long().to(prediction.device)
    confusion = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    confusion = confusion[: num_classes * num_classes].reshape(num_classes, num_classes).double().cpu().numpy()
    true_positive = np.diag(confusion)
    return np.stack([true_positive, confusion.sum(axis=0) - true_positive, confusion.sum(axis=1) - true_positive],
                    axis=1)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from ``overlap_counts``; NaN where the class is absent from both."""
    true_positive, false_positive, false_negative = np.asarray(counts, dtype=np.float64).T
    denominator = 2 * true_positive + false_positive + false_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * true_positive / denominator, np.nan)


def dice_per_class(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                   num_classes: int) -> np.ndarray:
    """3D Dice of one volume for each class, from summed true/false positives and negatives.

    Written here (as in nnU-Net) because MONAI's DiceMetric gives either 1.0 or NaN for an empty
    ground truth whatever the prediction; here a class absent from both is NaN (left out of
    means, never counted as 1.0) and a class predicted where there is none scores 0.
    """
    return dice_from_counts(overlap_counts(prediction, target, num_classes))


def hd95_per_class(prediction: np.ndarray, target: np.ndarray, num_classes: int,
                   spacing: Sequence[float]) -> np.ndarray:
    """95th percentile Hausdorff distance in mm per foreground class (MONAI); NaN for the
    background (its surface is the body's and the array's edge: costly, and nothing uses it) and
    where either mask is empty (those volumes are counted by ``misses_per_class`` instead, so a
    miss is never hidden). ``spacing`` is the voxel size along each array axis."""
    prediction = torch.as_tensor(np.asarray(prediction)).long()
    target = torch.as_tensor(np.asarray(target)).long()
    result = np.full(num_classes, np.nan)
    for c in range(1, num_classes):
        predicted, actual = prediction == c, target == c
        if not predicted.any() or not actual.any():
            continue
        with warnings.catch_warnings():
            # MONAI 1.6 itself passes the deprecated always_return_as_numpy to get_mask_edges inside
            # compute_hausdorff_distance; nothing a caller passes avoids the FutureWarning, so this
            # one message is silenced here, and only here.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            distance = compute_hausdorff_distance(predicted[None, None], actual[None, None], include_background=True,
                                                  percentile=95, spacing=[float(s) for s in spacing])
        result[c] = float(distance.reshape(-1)[0])
    return result


def misses_per_class(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """1 where the class is in exactly one of prediction and ground truth (missed, or predicted
    where there is none): the volumes that HD95 cannot score."""
    prediction, target = np.asarray(prediction), np.asarray(target)
    return np.array([int((prediction == c).any() != (target == c).any()) for c in range(num_classes)])


def nan_mean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def summarise(dice: np.ndarray, hd95: np.ndarray, misses: np.ndarray, class_names: Sequence[str],
              checkpoint, postprocessing: dict | None = None) -> dict:
    """summary.json: per-class mean and std over volumes (NaN skipped), HD95 mean over the volumes
    where it is defined, and the number of volumes where the organ was missed or invented."""
    def column_stat(values: np.ndarray, fn) -> dict:
        out = {}
        for c, name in enumerate(class_names):
            finite = values[:, c][np.isfinite(values[:, c])]
            out[name] = float(fn(finite)) if finite.size else None
        return out

    per_class = column_stat(dice, np.mean)
    foreground = [per_class[n] for n in class_names[1:] if per_class[n] is not None]
    return {
        "per_class_dice": per_class,
        "per_class_dice_std": column_stat(dice, np.std),
        "mean_foreground_dice": float(np.mean(foreground)) if foreground else None,
        "per_class_hd95": column_stat(hd95, np.mean),
        "per_class_hd95_std": column_stat(hd95, np.std),
        "per_class_misses": {name: int(np.asarray(misses)[:, c].sum()) for c, name in enumerate(class_names)},
        "n_cases": int(dice.shape[0]),
        "checkpoint": checkpoint,
        "postprocessing": postprocessing or {},
    }


def json_ready(value):
    """Plain JSON: NaN and infinities (absent organs, undefined HD95) become null."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_value(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def write_rows(rows: list[dict], path: Path) -> None:
    """A CSV of dict rows, floats to 6 significant digits (the header is the first row's keys)."""
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(v) for k, v in row.items()})


def print_table(summary: dict, class_names: Sequence[str]) -> None:
    print(f"\nPer-class 3D Dice over {summary['n_cases']} volume(s) (mean ± std; HD95 in mm over the volumes "
          "where both masks exist; misses: volumes where the organ is missed or predicted where there is none)")
    print(f"  {'class':<12} {'Dice':<18} {'HD95':>8} {'misses':>7}")
    for name in class_names:
        mean, std = summary["per_class_dice"][name], summary["per_class_dice_std"][name]
        hd = summary["per_class_hd95"][name]
        text = "n/a" if mean is None else f"{mean:.4f} ± {std:.4f}"
        print(f"  {name:<12} {text:<18} {'n/a' if hd is None else f'{hd:.2f}':>8} "
              f"{summary['per_class_misses'][name]:>7}")
    if summary["mean_foreground_dice"] is not None:
        print(f"  {'foreground':<12} {summary['mean_foreground_dice']:.4f}")
