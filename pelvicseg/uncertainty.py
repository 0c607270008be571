"""Uncertainty of a prediction: voxel-wise normalised predictive entropy (the uncertainty map), a
score per organ (the expected Dice deficit, from the class probabilities), and the review flag
whose thresholds on that score are fitted on the validation patients of a run.

The entropy is that of the class probabilities averaged over whatever the prediction averages
(ensemble members, test-time flips): high where the averaged members disagree or each is unsure,
zero where all put probability one on the same class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage, stats
from sklearn.metrics import roc_auc_score

from pelvicseg.atomic import atomic_path

# The largest float32 slope with 255 * slope <= 1: the uint8 file then reads back in [0, 1] (the
# float32 nearest 1/255 is slightly above it, which would read 255 back as 1.00000006).
UNCERTAINTY_SLOPE = float(np.nextafter(np.float32(1 / 255), np.float32(0)))
UNCERTAINTY_LEVELS = 255

SCORE_NAME = "expected_dice_deficit"  # stored in the rule's settings: a rule fitted on another score is refitted
ORGAN_SCORE = ("expected Dice deficit: 1 - soft Dice between the organ's delivered mask and its averaged class "
               "probability, on the source grid (voxels the post-processing took from the organ count as not it)")
FLAG_RULE = ("a case is flagged for review when, for any organ, its score is above that organ's threshold, "
             "or an organ predicted in every validation case is not predicted at all")
MIN_CASES_FOR_FIT = 8  # below this (or with fewer than 2 poor or 2 good organs) the median-plus-margin rule is used
REVIEW_MARGIN = 0.05  # Dice units: flag an organ the model expects at least this much worse than its typical case
MIN_CASES_PER_GROUP = 2


def normalised_entropy(probabilities: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Predictive entropy divided by log(C), in [0, 1]: ``(C, X, Y, Z) -> (X, Y, Z)`` with the
    default ``dim=0``; pass ``dim=1`` for ``(B, C, X, Y, Z) -> (B, X, Y, Z)``.

    ``probabilities`` sum to one along ``dim`` (softmax outputs, or their average). Terms with
    p = 0 contribute 0 (``xlogy``), never NaN. Computed in float32 at least, since bf16/fp16
    probabilities would quantise the small entropies of confident voxels to zero.
    """
    probabilities = torch.as_tensor(probabilities)
    num_classes = probabilities.shape[dim]
    if num_classes < 2:
        raise ValueError(f"normalised_entropy: needs at least 2 classes along dim {dim}, got shape "
                         f"{tuple(probabilities.shape)}")
    if not probabilities.is_floating_point() or probabilities.element_size() < 4:
        probabilities = probabilities.float()
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=dim) / math.log(num_classes)
    return entropy.clamp_(0.0, 1.0)  # rounding can step just outside [0, 1]


def write_uncertainty(entropy: np.ndarray, source: nib.Nifti1Image, path: str | Path) -> None:
    """Save ``entropy (X, Y, Z)`` (values in [0, 1], on the source image's voxel grid) with the
    source's affine and q/s-form codes, like the predicted labels, so it opens over the image.

    Stored as uint8 with ``scl_slope`` about 1/255 (readers get floats in [0, 1], step 1/255,
    error at most 0.002): a quarter of float32's size before compression, and far smaller after
    it, since float32 entropies are noisy in every bit while the uint8 map is zero in most of the
    volume. The step is far below any difference a reviewer or a threshold acts on.
    """
    entropy = np.asarray(entropy)
    source_shape = tuple(source.shape)
    if entropy.ndim != 3 or entropy.shape != source_shape[:3] or any(s != 1 for s in source_shape[3:]):
        raise ValueError(f"{path}: uncertainty of shape {entropy.shape} does not match the source image's "
                         f"grid {source_shape}")
    levels = np.rint(np.clip(np.nan_to_num(entropy, nan=1.0), 0.0, 1.0) * UNCERTAINTY_LEVELS).astype(np.uint8)
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(levels, source.affine, header=header)
    image.header.set_slope_inter(UNCERTAINTY_SLOPE, 0.0)  # after construction, which resets scaling
    image.set_qform(source.affine, code=int(source.header["qform_code"]) or 1)
    image.set_sform(source.affine, code=int(source.header["sform_code"]) or 1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))


def organ_uncertainty(entropy: np.ndarray, labels: np.ndarray, num_classes: int,
                      classes: Sequence[int] | None = None) -> np.ndarray:
    """Boundary-band entropy per class, ``(num_classes,)``: the mean of ``entropy (X, Y, Z)`` over
    the boundary band of the class's predicted mask in ``labels (X, Y, Z)``; NaN where the class
    is not predicted, and NaN for the background (index 0), which has no contour to review. The
    uncertainty figure picks its organ and slice by it (the map shows entropy); the review flags
    threshold ``expected_dice_deficit`` instead, which tracks an organ's Dice error better.

    Why the boundary band (the mask dilated by one voxel minus the mask eroded by one voxel):
    a contour is wrong where its edge lies in the wrong place, and that is where the averaged
    probabilities are split between the organ and its neighbours. The interior of an organ is
    classified confidently whether or not its edge is right, so a mean over the whole organ is
    mostly a measure of its surface-to-volume ratio: it would score a small prostate as more
    uncertain than a large bladder with the same edge quality, and it would shrink a bad edge
    of the bladder or the body towards zero. The band compares edges with edges, across organs
    and cases. It reaches one voxel outside the mask, so it also sees over- and under-segmented
    edges where the neighbouring class won the arg-max by a small margin. What it cannot see
    is a part of the organ missed far from the predicted contour.

    The edge of the array is not a contour (the body runs out of the field of view), so
    erosion treats outside the array as organ there. ``classes`` limits the work to those classes
    (the others stay NaN).
    """
    entropy, labels = np.asarray(entropy), np.asarray(labels)
    if entropy.shape != labels.shape:
        raise ValueError(f"organ_uncertainty: entropy {entropy.shape} and labels {labels.shape} differ in shape")
    scores = np.full(num_classes, np.nan)
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    boxes = ndimage.find_objects(labels.astype(np.int64, copy=False), max_label=num_classes - 1)
    for c in (range(1, num_classes) if classes is None else [c for c in classes if c > 0]):
        box = boxes[c - 1] if c - 1 < len(boxes) else None
        if box is None:
            continue
        # work in the class's bounding box grown by one voxel: the same band, much less work
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, labels.shape))
        mask = labels[box] == c
        band = (ndimage.binary_dilation(mask, structure)
                & ~ndimage.binary_erosion(mask, structure, border_value=1))
        scores[c] = float(entropy[box][band].mean(dtype=np.float64))
    return scores


def expected_dice_deficit(probabilities, labels: np.ndarray, raw_labels: np.ndarray | None = None) -> np.ndarray:
    """The organ score the review flags threshold, per class ``(C,)``: one minus the soft Dice
    between the delivered mask ``m = (labels == c)`` and the class's probability ``p`` over the
    whole volume, ``1 - 2 sum(p m) / (sum(p) + sum(m))``; NaN where the class is not predicted,
    and NaN for the background (index 0).

    ``probabilities`` ``(C, X, Y, Z)`` (torch or numpy: the averaged softmax, on the grid of
    ``labels``). If each voxel's class were drawn from ``p``, ``sum(p m)`` would be the expected
    overlap with the mask and ``sum(p)`` the expected size of the organ, so ``1 - score`` is the
    Dice the model expects of its own contour, and the score is in Dice units. Equivalently it is
    ``(sum(p (1 - m)) + sum((1 - p) m)) / (sum(p) + sum(m))``: the organ's probability outside its
    mask (a missed part the model half believes in, a half-believed rival island) plus the doubt
    inside the mask (a diffuse wrong island that won the arg-max, a boundary in the wrong place),
    over the organ's expected size. It is relative to that size, so a small prostate and a large
    body with the same share of doubtful voxels score alike, and it reaches any distance from the
    contour, unlike a boundary-band entropy. A confidently wrong region (p near 1) is invisible to
    it, as to any score made from the probabilities alone.

    ``raw_labels``: the arg-max labels before post-processing. A voxel the post-processing took
    from class ``c`` (an island removed by the largest-component step) leaves ``c``'s probability
    mass too: the pipeline has decided that it is not the organ, so it must not count as a missed
    part of the delivered contour. Sums are in float64.
    """
    probabilities = torch.as_tensor(probabilities)
    labels = np.asarray(labels)
    num_classes = probabilities.shape[0]
    if probabilities.ndim != labels.ndim + 1 or tuple(probabilities.shape[1:]) != labels.shape:
        raise ValueError(f"expected_dice_deficit: probabilities {tuple(probabilities.shape)} do not match labels "
                         f"{labels.shape} as (C, *labels.shape)")
    probabilities = probabilities.detach().cpu().reshape(num_classes, -1)
    flat = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    mass = probabilities.sum(dim=1, dtype=torch.float64)  # sum(p) per class
    own = probabilities.gather(0, flat[None])[0].double()  # each voxel's probability of its own label
    overlap = torch.bincount(flat, weights=own, minlength=num_classes)[:num_classes]  # sum(p m) per class
    size = torch.bincount(flat, minlength=num_classes)[:num_classes].double()  # sum(m) per class
    if raw_labels is not None:
        raw = torch.from_numpy(np.asarray(raw_labels).reshape(-1).astype(np.int64))
        if raw.numel() != flat.numel():
            raise ValueError(f"expected_dice_deficit: raw labels {np.shape(raw_labels)} and labels {labels.shape} differ")
        taken = raw != flat
        if bool(taken.any()):
            raw_taken = raw[taken]
            removed = probabilities[:, taken].gather(0, raw_taken[None])[0].double()
            mass -= torch.bincount(raw_taken, weights=removed, minlength=num_classes)[:num_classes]
    scores = (1.0 - 2.0 * overlap / (mass.clamp(min=0.0) + size)).numpy()
    scores[size.numpy() == 0] = np.nan
    scores[0] = np.nan
    return np.clip(scores, 0.0, 1.0)


# ----------------------------------------------------------------------------- review flag

def fit_flag_thresholds(scores: np.ndarray, dice: np.ndarray, class_names: Sequence[str],
                        poor_quantile: float = 0.25) -> dict:
    """The review rule, fitted on validation cases: per organ, a threshold on its score.

    ``scores`` and ``dice`` are ``(n_cases, C)`` (``expected_dice_deficit`` and 3D Dice per case).
    An organ in a case counts as poor when its Dice is in the lowest ``poor_quantile`` of that
    organ's validation Dice: organs differ too much in attainable Dice (body near 1, prostate
    far lower) for one absolute cut, and the lowest quarter is what a reviewer most needs to
    see without flagging half of all contours. The threshold is the midpoint between two
    consecutive validation scores that maximises Youden's J (sensitivity + specificity - 1)
    for finding the poor organs; on ties the higher threshold wins (fewer flags).

    With fewer than ``MIN_CASES_FOR_FIT`` cases where the organ is both predicted and scored,
    fewer than two poor or good ones, or no threshold with J > 0 (the score does not separate
    them on validation), the threshold is the organ's median validation score plus
    ``REVIEW_MARGIN`` (0.05): the organ is flagged when the model expects its Dice to be at
    least 5 points below what it expected for its typical validation case. Why this and not a
    fitted cut: with so few cases (a run's validation patients, often 2 to 6 volumes) a
    quantile, a Tukey fence or a Youden cut rests on one or two values and on the spread
    between cases rather than on a difference that matters; the median is the most stable
    summary of few values, and the score is in Dice units, so the margin is a stated amount of
    Dice rather than a multiple of a noisy spread. It is relative to the organ's own median, so
    an organ that is hard in every case is not flagged in every case, and a self-estimate that
    is biased (a young model's probabilities are rarely calibrated) is compared with itself.
    Five Dice points is what a wrong island or a missed part of a tenth of the organ's volume
    costs (2 x 0.9 / 1.9 = 0.947): enough to need a look. The margin is in the score's units,
    which are Dice units only as far as the probabilities are calibrated; a class-weighted loss
    inflates the rare organs' probabilities and so stretches their scores, and the margin is
    then effectively smaller for them.

    Returns a JSON-able dict (no NaN): the rule in words, ``n_cases``, ``margin``, and per
    foreground organ ``threshold``, ``method`` ("youden", "margin", or "none" with no threshold
    for an organ never predicted on validation), ``median`` (of its validation scores),
    ``dice_median`` (of its validation Dice: what "worse than validation" is measured against),
    ``n_scored``, ``n_poor``, ``poor_dice_below``, ``sensitivity``, ``specificity`` and
    ``youden_j`` on the validation cases (None where not defined), and ``expected`` (predicted
    in every validation case, so a case where it is absent is flagged).
    """
    scores = np.asarray(scores, dtype=np.float64)
    dice = np.asarray(dice, dtype=np.float64)
    if scores.shape != dice.shape or scores.ndim != 2 or scores.shape[1] != len(class_names):
        raise ValueError(f"fit_flag_thresholds: scores {scores.shape} and dice {dice.shape} must both be "
                         f"(n_cases, {len(class_names)})")
    organs = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        organ_scores, organ_dice = scores[:, c], dice[:, c]
        scored = np.isfinite(organ_scores) & np.isfinite(organ_dice)
        fit = {"median": None, "dice_median": None, "n_scored": int(scored.sum()), "n_poor": None,
               "poor_dice_below": None,
               "sensitivity": None, "specificity": None, "youden_j": None,
               "expected": bool(scores.shape[0] > 0 and np.isfinite(organ_scores).all())}
        if scored.any():
            fit["median"] = float(np.median(organ_scores[scored]))
            fit["dice_median"] = float(np.median(organ_dice[scored]))
            poor_dice_below = float(np.quantile(organ_dice[scored], poor_quantile))
            poor = organ_dice[scored] < poor_dice_below
            fit["poor_dice_below"], fit["n_poor"] = poor_dice_below, int(poor.sum())
            threshold, method = _youden_threshold(organ_scores[scored], poor), "youden"
            if threshold is None:
                threshold, method = fit["median"] + REVIEW_MARGIN, "margin"
            flagged = organ_scores[scored] > threshold
            if poor.any():
                fit["sensitivity"] = float((flagged & poor).sum() / poor.sum())
            if (~poor).any():
                fit["specificity"] = float((~flagged & ~poor).sum() / (~poor).sum())
            if fit["sensitivity"] is not None and fit["specificity"] is not None:
                fit["youden_j"] = fit["sensitivity"] + fit["specificity"] - 1
        else:
            threshold, method = None, "none"  # never predicted on validation: only the absence rule applies
        organs[name] = {"threshold": threshold, "method": method, **fit}
    return {"score": ORGAN_SCORE, "rule": FLAG_RULE, "poor": f"Dice below the organ's validation "
            f"{poor_quantile:g} quantile", "poor_quantile": poor_quantile, "margin": REVIEW_MARGIN,
            "n_cases": int(scores.shape[0]), "organs": organs}


def review_settings(tta: bool, overlap: float, largest_component: Sequence[str]) -> dict:
    """The prediction settings a review rule is fitted under (the scores depend on them, and on
    which score it is): stored with the rule, so that predict.py refits when it runs with other
    settings, or finds a rule fitted on another score (an uncertainty.json of an older version)."""
    return {"tta": bool(tta), "overlap": float(overlap), "largest_component": sorted(largest_component),
            "score": SCORE_NAME}


def fit_from_volumes(volumes: Sequence[dict], class_names: Sequence[str]) -> dict:
    """``fit_flag_thresholds`` on validation volume records ``{"uncertainty": [C], "dice": [C]}``
    (as training stores them in uncertainty.json; null for NaN), with ``held_out``: how often the
    rule flags validation volumes it was not fitted on (``held_out_flags``)."""
    scores, dice = _volume_arrays(volumes, class_names)
    rule = fit_flag_thresholds(scores, dice, class_names)
    rule["held_out"] = held_out_flags(volumes, class_names)
    return rule


def held_out_flags(volumes: Sequence[dict], class_names: Sequence[str]) -> dict | None:
    """How often the review rule flags a volume like the validation ones that it was not fitted on:
    each validation patient's volumes flagged by the rule fitted on the other validation patients'
    volumes (each volume by the rule fitted on the others where the records name no patient, as in
    an uncertainty.json of an older version; later weeks of the same patient would then share the
    fit). The flag rate on the fitted volumes themselves says little, since the thresholds were
    placed among them; this is the rate to expect on new patients like the validation ones, so a
    rule that flags most of these is a rule that is always on. None with fewer than two patients.

    Returns ``{"held_out": "patient" | "volume", "n_volumes", "n_flagged_volumes", "n_organs",
    "n_flagged_organs", "flagged": [{"case", "organ", "dice"}]}``: ``n_organs`` counts the organs
    scored (predicted) in the held-out volumes; ``dice`` lets a reader see whether the flagged ones
    were the poor ones."""
    if not all(v.get("patient") for v in volumes):
        groups, unit = list(range(len(volumes))), "volume"
    else:
        groups, unit = [v["patient"] for v in volumes], "patient"
    if len(set(groups)) < 2:
        return None
    scores, dice = _volume_arrays(volumes, class_names)
    groups = np.array(groups)
    result = {"held_out": unit, "n_volumes": len(volumes), "n_flagged_volumes": 0,
              "n_organs": int(np.isfinite(scores[:, 1:]).sum()), "n_flagged_organs": 0, "flagged": []}
    for group in dict.fromkeys(groups.tolist()):
        held = groups == group
        rule = fit_flag_thresholds(scores[~held], dice[~held], class_names)
        for index in np.flatnonzero(held):
            flags = flag_case(scores[index], rule, class_names)
            result["n_flagged_volumes"] += bool(flags)
            result["n_flagged_organs"] += len(flags)
            result["flagged"] += [{"case": volumes[index].get("case"), "organ": f["organ"],
                                   "dice": float(dice[index, class_names.index(f["organ"])])} for f in flags]
    return result


def describe_held_out(held_out: dict | None) -> str:
    """One line for the logs: how often the rule flags held-out validation volumes."""
    if held_out is None:
        return "fewer than two validation patients, so no held-out flag rate"
    return (f"it flags {held_out['n_flagged_volumes']} of {held_out['n_volumes']} validation volume(s) "
            f"({held_out['n_flagged_organs']} of {held_out['n_organs']} organs), each fitted without that "
            f"{held_out['held_out']}")


def _volume_arrays(volumes: Sequence[dict], class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.array([v["uncertainty"] for v in volumes], dtype=float).reshape(-1, len(class_names))
    dice = np.array([v["dice"] for v in volumes], dtype=float).reshape(-1, len(class_names))
    return scores, dice


def _youden_threshold(organ_scores: np.ndarray, poor: np.ndarray) -> float | None:
    if (poor.size < MIN_CASES_FOR_FIT or poor.sum() < MIN_CASES_PER_GROUP
            or (~poor).sum() < MIN_CASES_PER_GROUP):
        return None
    levels = np.unique(organ_scores)
    best_threshold, best_j = None, 0.0
    for threshold in (levels[:-1] + levels[1:]) / 2:
        flagged = organ_scores > threshold
        j = flagged[poor].mean() + (~flagged[~poor]).mean() - 1
        if j >= best_j and j > 0:  # ascending thresholds: '>=' keeps the highest among ties
            best_threshold, best_j = float(threshold), j
    return best_threshold


def flag_case(scores: np.ndarray, rule: dict, class_names: Sequence[str]) -> list[dict]:
    """The organs that flag one case for review under ``rule`` (from ``fit_flag_thresholds``):
    ``[{"organ": name, "score": s, "threshold": t, "reason": "uncertain" | "not predicted"}]``,
    in class order; empty when the case needs no closer look. ``scores`` is ``(C,)`` from
    ``expected_dice_deficit``; ``score`` is None for an organ that is not predicted."""
    scores = np.asarray(scores, dtype=np.float64)
    flags = []
    for c, name in enumerate(class_names):
        organ = rule["organs"].get(name) if c > 0 else None
        if organ is None:
            continue
        threshold = organ["threshold"]
        if not np.isfinite(scores[c]):
            if organ.get("expected"):
                flags.append({"organ": name, "score": None, "threshold": threshold, "reason": "not predicted"})
        elif threshold is not None and scores[c] > threshold:
            flags.append({"organ": name, "score": float(scores[c]), "threshold": threshold, "reason": "uncertain"})
    return flags


# ----------------------------------------------------------------------------- measuring the score

def voxel_error_auroc(entropy: np.ndarray, prediction: np.ndarray, target: np.ndarray,
                      body_mask: np.ndarray | None = None) -> float:
    """How well the voxel entropy ranks wrong voxels above right ones: ROC AUC of ``entropy`` for
    ``prediction != target`` over the voxels in ``body_mask`` (all voxels if None). 0.5 is
    chance, 1 a perfect ranking; NaN when the voxels are all right or all wrong."""
    entropy, prediction, target = np.asarray(entropy), np.asarray(prediction), np.asarray(target)
    inside = np.ones(entropy.shape, dtype=bool) if body_mask is None else np.asarray(body_mask, dtype=bool)
    wrong = (prediction != target)[inside]
    if wrong.all() or not wrong.any():
        return math.nan
    return float(roc_auc_score(wrong, entropy[inside]))


def rank_correlation(scores: np.ndarray, dice: np.ndarray) -> float:
    """Spearman's rank correlation between organ scores and Dice over the pairs where both are
    finite (any matching shapes, e.g. ``(n_cases, C)`` or one organ's column); a score that
    tracks errors correlates negatively. NaN with fewer than 3 pairs or a constant side."""
    scores, dice = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(dice, dtype=np.float64).ravel()
    if scores.shape != dice.shape:
        raise ValueError(f"rank_correlation: {scores.size} scores and {dice.size} Dice values")
    both = np.isfinite(scores) & np.isfinite(dice)
    if both.sum() < 3 or np.ptp(scores[both]) == 0 or np.ptp(dice[both]) == 0:
        return math.nan
    return float(stats.spearmanr(scores[both], dice[both]).statistic)
