"""One volume evaluated one way, for training's final validation and for predict.py alike:
probabilities on the preprocessed grid -> the source grid -> post-processing -> labels ->
uncertainty -> metrics.

Because both call ``evaluate_volume``, what training fits on its validation patients (the
post-processing decision, the review thresholds) is computed on exactly what predict.py reports
and thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from dataset import voxel_spacing, voxel_volume_ml
from pelvicseg.inference import keep_largest_component, labels_from_probabilities, to_source_grid, volume_figures
from pelvicseg.metrics import dice_per_class, hd95_per_class, misses_per_class
from pelvicseg.uncertainty import expected_dice_deficit, normalised_entropy


def evaluate_volume(probabilities: torch.Tensor, preprocessed_image: MetaTensor, source: nib.Nifti1Image,
                    class_names: Sequence[str], largest_component: Sequence[str] = (),
                    target: np.ndarray | None = None, hd95: bool = True, alternatives: bool = False,
                    keep_probabilities: bool = False) -> dict:
    """Evaluate one volume from its class probabilities ``(C, X, Y, Z)`` on the preprocessed grid.

    ``preprocessed_image`` carries the two grids (its affine and the source's); ``source`` is the
    source image as nibabel reads it, the one geometry for spacing (HD95) and voxel volume.
    ``largest_component`` names the organs whose largest connected component alone is kept.
    ``target`` (labels on the source grid) adds Dice, HD95, misses and true volumes.
    ``alternatives`` (training's final validation, with ``largest_component`` empty) adds, per
    organ, the figures with that organ's largest-component step (``dice_lcc``, ``hd95_lcc``,
    ``uncertainty_lcc``): the step changes that organ's mask alone, so these are exactly the
    figures any combination of decided steps gives for that organ.
    ``keep_probabilities`` adds ``probabilities``: ``(C, X, Y, Z)`` on the source grid, the ones
    the labels are the arg-max of (before post-processing).

    Returns labels ``(X, Y, Z)`` uint8 and entropy ``(X, Y, Z)`` on the source grid, and per class
    (lists of length C): ``uncertainty`` (``uncertainty.expected_dice_deficit`` of the delivered
    labels: the score the review flags threshold), ``pred_volume_ml``, and with a target ``dice``, ``hd95``,
    ``misses``, ``gt_volume_ml`` (None without one).
    """
    num_classes = len(class_names)
    source_probabilities = to_source_grid(probabilities, preprocessed_image)
    raw = labels_from_probabilities(source_probabilities)
    entropy = normalised_entropy(source_probabilities).numpy()
    kept = [class_names.index(name) for name in largest_component if name in class_names]
    labels = keep_largest_component(raw, kept) if kept else raw
    spacing, voxel_ml = voxel_spacing(source.affine), voxel_volume_ml(source.affine)
    # the organ scores the review flags threshold: from the probabilities, against the delivered labels
    scores = expected_dice_deficit(source_probabilities, labels, raw_labels=raw)
    if alternatives:
        if kept:
            raise ValueError("evaluate_volume: alternatives are measured against the labels before post-processing")
        figures = volume_figures(raw, target, num_classes, spacing, probabilities=source_probabilities, hd95=hd95)
    kept_probabilities = source_probabilities if keep_probabilities else None
    del source_probabilities  # a full-resolution copy per class: freed early unless asked for
    result = {"labels": labels, "entropy": entropy, "uncertainty": scores.tolist(),
              "pred_volume_ml": (np.bincount(labels.reshape(-1), minlength=num_classes)[:num_classes]
                                 * voxel_ml).tolist(),
              "dice": None, "hd95": None, "misses": None, "gt_volume_ml": None}
    if keep_probabilities:
        result["probabilities"] = kept_probabilities
    if target is not None:
        target = np.asarray(target)
        if target.shape != labels.shape:
            raise ValueError(f"evaluate_volume: labels {target.shape} and prediction {labels.shape} differ in shape")
        result["dice"] = dice_per_class(labels, target, num_classes).tolist()
        result["hd95"] = (hd95_per_class(labels, target, num_classes, spacing) if hd95
                          else np.full(num_classes, np.nan)).tolist()
        result["misses"] = misses_per_class(labels, target, num_classes).tolist()
        result["gt_volume_ml"] = (np.bincount(target.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]
                                  * voxel_ml).tolist()
    if alternatives:
        result.update({key: figures[key] for key in ("dice_lcc", "hd95_lcc", "uncertainty_lcc")})
    return result


def with_postprocessing(record: dict, largest_component: Sequence[str], class_names: Sequence[str]) -> dict:
    """A validation record (``evaluate_volume`` with ``alternatives``) as it reads once the decided
    largest-component steps are applied: per organ in ``largest_component``, its ``_lcc`` figures."""
    chosen = {class_names.index(name) for name in largest_component if name in class_names}
    selected = dict(record)
    for key in ("dice", "hd95", "uncertainty"):
        if record.get(key) is None:
            continue
        selected[key] = [record[f"{key}_lcc"][c] if c in chosen else value for c, value in enumerate(record[key])]
    return selected
