"""An adapted model checked against its parent on every scan it segments.

A model fine-tuned on one patient's reference scans can, on a later scan, lose an organ the
parent still finds: on HipMRI-shaped data one adapted model labelled air in a corner as bladder
and the true bladder as background (Dice 0 where the parent had 0.94). Its own reference scans
cannot show this, so every prediction of an adapted model also runs the parent, and per organ:

- an organ the adaptation decided on the validation patients' later weeks to leave to the parent
  (``organs[name] == "parent"``) is the parent's, on every scan, without a flag;
- an adapted organ that disagrees grossly with the parent's on this scan (too little overlap, a
  volume several times off, a centroid far away; ``thresholds`` fitted on the validation
  patients' later weeks, where no collapse happened) falls back to the parent's, and the case is
  flagged with the reason.

The combination is made on the class probabilities of the preprocessed grid, before anything
else: where an organ falls back, the voxels either model gives that organ take the parent's
probability vector, every other voxel keeps the adapted one. Its arg-max is then the parent's
organ exactly, the rest the adapted model's labels, and the uncertainty, post-processing and
metrics downstream (``evaluation.evaluate_volume``) see one consistent set of probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Margins around the worst agreement seen on the validation patients' later weeks, and floors
# under them: a handful of validation scans give extremes that a new scan will pass by chance,
# so the guard fires only on disagreement well beyond them (a collapse is far beyond: overlap 0,
# a centroid several centimetres away).
OVERLAP_MARGIN = 0.5  # the threshold is half the lowest overlap seen
VOLUME_RATIO_MARGIN = 1.5  # 1.5 times the largest ratio seen ...
VOLUME_RATIO_FLOOR = 2.0  # ... and never below 2
CENTROID_MARGIN = 1.5  # 1.5 times the largest distance seen ...
CENTROID_FLOOR_MM = 10.0  # ... and never below 1 cm
GUARD_KEYS = ("overlap", "volume_ratio", "centroid_mm")


def organ_agreement(adapted: np.ndarray, parent: np.ndarray, organ: int, spacing: Sequence[float]) -> dict:
    """How the adapted model's ``organ`` compares with the parent's on one label map pair (same
    grid, voxel ``spacing`` in mm): ``overlap`` (Dice between the two masks), ``volume_ratio``
    (the larger volume over the smaller, >= 1) and ``centroid_mm`` (distance of the centroids).
    Both absent: all None (nothing to compare); one absent: overlap 0, ratio and distance inf."""
    mine, theirs = adapted == organ, parent == organ
    size_mine, size_theirs = int(mine.sum()), int(theirs.sum())
    if size_mine == 0 and size_theirs == 0:
        return {"overlap": None, "volume_ratio": None, "centroid_mm": None}
    if size_mine == 0 or size_theirs == 0:
        return {"overlap": 0.0, "volume_ratio": math.inf, "centroid_mm": math.inf}
    overlap = 2.0 * np.logical_and(mine, theirs).sum() / (size_mine + size_theirs)
    scale = np.asarray(spacing, dtype=float)
    distance = np.linalg.norm((np.argwhere(mine).mean(0) - np.argwhere(theirs).mean(0)) * scale)
    return {"overlap": float(overlap), "volume_ratio": max(size_mine, size_theirs) / min(size_mine, size_theirs),
            "centroid_mm": float(distance)}


def agreement_per_organ(adapted: np.ndarray, parent: np.ndarray, class_names: Sequence[str],
                        spacing: Sequence[float]) -> dict:
    return {name: organ_agreement(adapted, parent, c, spacing) for c, name in enumerate(class_names) if c > 0}


def fit_thresholds(agreements: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Per organ, thresholds the agreements of the validation patients' later weeks (each an
    ``agreement_per_organ`` of the chosen setting) all pass with a margin: ``min_overlap``,
    ``max_volume_ratio``, ``max_centroid_mm``, and ``scans`` (how many they were fitted on)."""
    thresholds = {}
    for name in class_names[1:]:
        seen = [a[name] for a in agreements if a[name]["overlap"] is not None]
        overlaps = [s["overlap"] for s in seen]
        ratios = [s["volume_ratio"] for s in seen if math.isfinite(s["volume_ratio"])]
        distances = [s["centroid_mm"] for s in seen if math.isfinite(s["centroid_mm"])]
        thresholds[name] = {
            "min_overlap": OVERLAP_MARGIN * min(overlaps) if overlaps else 0.0,
            "max_volume_ratio": max(VOLUME_RATIO_FLOOR, VOLUME_RATIO_MARGIN * max(ratios, default=1.0)),
            "max_centroid_mm": max(CENTROID_FLOOR_MM, CENTROID_MARGIN * max(distances, default=0.0)),
            "scans": len(seen)}
    return thresholds


def disagreement(agreement: dict, threshold: dict) -> str | None:
    """Why an adapted organ must not be trusted on this scan (one line), or None."""
    if agreement["overlap"] is None:
        return None
    reasons = []
    if agreement["overlap"] < threshold["min_overlap"]:
        reasons.append(f"overlap with the parent's {agreement['overlap']:.2f} < {threshold['min_overlap']:.2f}")
    if agreement["volume_ratio"] > threshold["max_volume_ratio"]:
        reasons.append(f"volume {agreement['volume_ratio']:.1f} times off the parent's "
                       f"(> {threshold['max_volume_ratio']:.1f})")
    if agreement["centroid_mm"] > threshold["max_centroid_mm"]:
        reasons.append(f"centroid {agreement['centroid_mm']:.0f} mm from the parent's "
                       f"(> {threshold['max_centroid_mm']:.0f} mm)")
    return "; ".join(reasons) or None


def combine(adapted: torch.Tensor, parent: torch.Tensor, class_names: Sequence[str], organs: dict,
            thresholds: dict | None, spacing: Sequence[float]) -> tuple[torch.Tensor, list[dict], dict]:
    """The delivered probabilities ``(C, X, Y, Z)`` from the adapted model's and the parent's (same
    grid). ``organs``: per organ name "adapted" or "parent" (missing: adapted). ``thresholds``:
    ``fit_thresholds``'s (None: no guard, only the decisions). Returns the probabilities, the
    fallbacks the guard made (``{"organ", "reason"}``, to flag the case) and the agreement of
    every organ (before any fallback)."""
    adapted_labels, parent_labels = adapted.argmax(0).numpy(), parent.argmax(0).numpy()
    agreement = agreement_per_organ(adapted_labels, parent_labels, class_names, spacing)
    fallbacks, to_parent = [], []
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        if organs.get(name, "adapted") == "parent":
            to_parent.append(c)
            continue
        reason = disagreement(agreement[name], thresholds[name]) if thresholds and name in thresholds else None
        if reason is not None:
            to_parent.append(c)
            fallbacks.append({"organ": name, "reason": f"adapted model disagrees with its parent: {reason}; "
                                                       "the parent's contour is delivered"})
    if not to_parent:
        return adapted, fallbacks, agreement
    mask = np.isin(adapted_labels, to_parent) | np.isin(parent_labels, to_parent)
    chosen = torch.from_numpy(mask)[None]
    return torch.where(chosen, parent, adapted), fallbacks, agreement


def guard_flags(fallbacks: Sequence[dict]) -> list[dict]:
    """The guard's fallbacks as review flags (``uncertainty.flag_case``'s form; no score)."""
    return [{"organ": f["organ"], "score": None, "threshold": None, "reason": f["reason"]} for f in fallbacks]
