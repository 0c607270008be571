"""guard.py on built probabilities: the thresholds fitted on agreeing pairs, and an adapted organ moved
far from the parent's falling back to the parent's, with the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pelvicseg import guard  # noqa: E402

NAMES = ["background", "body", "bone", "bladder", "rectum", "prostate"]
SHAPE = (32, 32, 16)
SPACING = (2.0, 2.0, 3.0)


def labels_with(bladder_centre, rectum_centre=(16, 22, 8)) -> np.ndarray:
    grid = np.indices(SHAPE)
    labels = np.ones(SHAPE, dtype=np.int64)  # body
    labels[:, :, :2] = 0
    for organ, centre, radius in ((3, bladder_centre, 5), (4, rectum_centre, 3)):
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
        labels[inside] = organ
    return labels


def probabilities(labels: np.ndarray) -> torch.Tensor:
    one_hot = np.eye(len(NAMES), dtype=np.float32)[labels]  # (X, Y, Z, C)
    return torch.from_numpy(0.1 / len(NAMES) + 0.9 * np.moveaxis(one_hot, -1, 0))


def test_an_organ_moved_far_falls_back_to_the_parents_and_is_flagged():
    parent = labels_with((16, 10, 8))
    # validation pairs: the adapted bladder a voxel off the parent's
    agreements = [guard.agreement_per_organ(labels_with((17, 10, 8)), parent, NAMES, SPACING),
                  guard.agreement_per_organ(labels_with((16, 11, 8)), parent, NAMES, SPACING)]
    thresholds = guard.fit_thresholds(agreements, NAMES)
    assert thresholds["bladder"]["max_centroid_mm"] == guard.CENTROID_FLOOR_MM  # 2 mm seen, 10 mm floor
    assert thresholds["bladder"]["scans"] == 2
    # the adapted bladder 10 voxels (20 mm) away, the rectum a voxel off (within its thresholds)
    moved = labels_with((26, 10, 8), rectum_centre=(17, 22, 8))
    delivered, fallbacks, agreement = guard.combine(probabilities(moved), probabilities(parent), NAMES, {},
                                                    thresholds, SPACING)
    assert agreement["bladder"]["centroid_mm"] == pytest.approx(20.0)
    assert [f["organ"] for f in fallbacks] == ["bladder"] and "centroid 20 mm" in fallbacks[0]["reason"]
    labels = delivered.argmax(0).numpy()
    np.testing.assert_array_equal(labels == 3, parent == 3)  # the parent's bladder, exactly
    np.testing.assert_array_equal(labels == 4, moved == 4)  # the adapted rectum kept
    flags = guard.guard_flags(fallbacks)
    assert flags[0]["organ"] == "bladder" and flags[0]["score"] is None and "parent" in flags[0]["reason"]


def test_an_organ_decided_for_the_parent_is_the_parents_without_a_flag():
    parent, adapted = labels_with((16, 10, 8)), labels_with((16, 10, 8), rectum_centre=(16, 24, 8))
    delivered, fallbacks, _ = guard.combine(probabilities(adapted), probabilities(parent), NAMES,
                                            {"rectum": "parent"}, None, SPACING)
    labels = delivered.argmax(0).numpy()
    np.testing.assert_array_equal(labels == 4, parent == 4)
    assert fallbacks == []
    # nothing decided, no guard: the adapted model's labels
    delivered, fallbacks, _ = guard.combine(probabilities(adapted), probabilities(parent), NAMES, {}, None, SPACING)
    np.testing.assert_array_equal(delivered.argmax(0).numpy(), adapted)
