"""figures.py: the uncertainty figure shows the slice through the most uncertain organ (not the
edge slice where summed entropy is largest), and areas below the entropy threshold stay grey.

Expected organs and slices are worked out here with scipy from the constructed volumes, not with
uncertainty.py or figures.py.
"""

from __future__ import annotations

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pelvicseg import figures
from pelvicseg.figures import save_uncertainty_figure, uncertainty_slice

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
BODY, BONE, BLADDER, RECTUM, PROSTATE = 1, 2, 3, 4, 5
SHAPE = (36, 32, 24)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pelvis() -> np.ndarray:
    """Labels (LPS axes): a body filling most of the field of view, bladder above the prostate,
    rectum behind it, two bones."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(float)

    def ellipsoid(centre, radii):
        centre, radii = (np.array(v, dtype=float)[:, None, None, None] for v in (centre, radii))
        return (((grid - centre) / radii) ** 2).sum(0) <= 1

    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:-3, 3:-3, :] = BODY  # runs out of the field of view at both axial ends, like a pelvic scan
    labels[ellipsoid((8, 16, 12), (3, 5, 10))] = BONE
    labels[ellipsoid((27, 16, 12), (3, 5, 10))] = BONE
    labels[ellipsoid((18, 12, 16), (5, 5, 4))] = BLADDER  # z 12..20
    labels[ellipsoid((18, 21, 8), (2, 3, 6))] = RECTUM
    labels[ellipsoid((18, 14, 7), (3, 3, 3))] = PROSTATE  # z 4..10
    return labels


def band(mask: np.ndarray) -> np.ndarray:
    """Within one voxel (6-connected) of the contour; the array's edge is no contour."""
    cross = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(mask, cross) & ~ndimage.binary_erosion(mask, cross, border_value=1)


def slices_of(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(mask.any(axis=(0, 1))).tolist())


def entropy_with_hot_organ(labels: np.ndarray, hot: int) -> np.ndarray:
    """Low entropy on every contour, high in and around ``hot``, and an edge slice (z = 0) that
    is uncertain everywhere: the largest summed entropy of any slice, which is not a contour."""
    rng = np.random.default_rng(1)
    entropy = np.zeros(labels.shape)
    for c in range(1, len(CLASS_NAMES)):
        entropy[band(labels == c)] = 0.1
    around = ndimage.binary_dilation(labels == hot, iterations=1)
    entropy[around] = rng.uniform(0.6, 0.9, size=around.sum())
    entropy[:, :, 0] = 0.5
    return entropy


def band_scores(entropy: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    return {c: entropy[band(labels == c)].mean() for c in range(1, len(CLASS_NAMES)) if (labels == c).any()}


@pytest.mark.parametrize("hot", [PROSTATE, BLADDER])
def test_chosen_slice_lies_inside_the_most_uncertain_organ(hot):
    labels = pelvis()
    entropy = entropy_with_hot_organ(labels, hot)
    scores = band_scores(entropy, labels)
    assert max(scores, key=scores.get) == hot
    assert entropy.sum(axis=(0, 1)).argmax() == 0  # what the largest-summed-entropy rule showed

    z, organ, score = uncertainty_slice(entropy, labels, len(CLASS_NAMES))
    assert organ == hot
    assert score == pytest.approx(scores[hot])
    assert z in slices_of(labels == hot)
    assert (labels[:, :, z] == hot).sum() > 0 and (labels[:, :, z] == BODY).any()  # inside the body
    # the slice whose share of the organ's band holds the most entropy
    per_slice = np.where(band(labels == hot), entropy, 0).sum(axis=(0, 1))
    assert z == int(np.argmax(per_slice))


def test_given_review_scores_choose_the_organ_over_the_boundary_band():
    """predict.py passes the case's review scores: the figure shows the organ the flags are about,
    even where another organ's boundary band holds more entropy."""
    labels = pelvis()
    entropy = entropy_with_hot_organ(labels, PROSTATE)  # the band rule alone would show the prostate
    review = np.zeros(len(CLASS_NAMES))
    review[BLADDER] = 0.4
    review[PROSTATE] = 0.1
    z, organ, score = uncertainty_slice(entropy, labels, len(CLASS_NAMES), scores=review)
    assert organ == BLADDER and score == pytest.approx(0.4)
    assert z in slices_of(labels == BLADDER)
    # an organ that is not predicted has no slice to show, whatever its score
    review[len(CLASS_NAMES) - 1] = 0.9
    without = np.where(labels == len(CLASS_NAMES) - 1, BODY, labels)
    assert uncertainty_slice(entropy, without, len(CLASS_NAMES), scores=review)[1] == BLADDER


def test_an_organ_reaching_the_edge_slice_is_shown_inside_the_field_of_view():
    labels = pelvis()
    entropy = np.zeros(SHAPE)
    entropy[band(labels == BODY)] = 0.4  # the body is the most uncertain organ
    entropy[:, :, 0] = entropy[:, :, -1] = 0.9  # padding artefacts at both axial ends
    z, organ, _ = uncertainty_slice(entropy, labels, len(CLASS_NAMES))
    assert organ == BODY
    assert 0 < z < SHAPE[2] - 1


def test_one_uncertain_voxel_picks_its_slice_and_none_picks_the_organ_centre():
    labels = pelvis()
    prostate = labels == PROSTATE
    entropy = np.zeros(SHAPE)
    on_band = np.argwhere(band(prostate) & prostate)
    voxel = on_band[on_band[:, 2] == 9][0]  # one voxel of the prostate's edge, on an upper slice of it
    entropy[tuple(voxel)] = 0.5
    z, organ, score = uncertainty_slice(entropy, labels, len(CLASS_NAMES))
    assert organ == PROSTATE and z == 9
    assert score == pytest.approx(0.5 / band(prostate).sum())

    z, organ, score = uncertainty_slice(np.zeros(SHAPE), labels, len(CLASS_NAMES))
    assert score == 0
    assert abs(z - np.argwhere(labels == organ)[:, 2].mean()) <= 0.5


def test_without_a_prediction_the_slice_with_most_entropy_is_shown_but_not_an_edge_slice():
    entropy = np.zeros(SHAPE)
    entropy[10:20, 10:20, 5] = 0.3
    entropy[15, 15, 17] = 1.0
    assert uncertainty_slice(entropy) == (5, None, None)
    entropy[:, :, -1] = 0.5  # padding artefacts of the last slice
    assert uncertainty_slice(entropy) == (5, None, None)


@pytest.mark.parametrize("axcodes", ["LPS", "RAS"])
def test_figure_is_written_on_the_chosen_slice(tmp_path, axcodes):
    labels = pelvis()
    entropy = entropy_with_hot_organ(labels, PROSTATE)
    image = np.random.default_rng(0).uniform(100, 200, size=SHAPE).astype(np.float32)
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    expected = uncertainty_slice(entropy, labels, len(CLASS_NAMES))[0]
    if axcodes == "RAS":  # the same anatomy stored the other way round on all three axes
        image, entropy, labels = (np.ascontiguousarray(a[::-1, ::-1, ::-1]) for a in (image, entropy, labels))
        affine = np.diag([1.5, 1.5, -2.0, 1.0])
        assert nib.aff2axcodes(affine) == ("R", "A", "I")
    path = tmp_path / "figures" / "case_uncertainty.png"
    z = save_uncertainty_figure(image, entropy, affine, path, prediction=labels, class_names=CLASS_NAMES,
                                title="case: uncertainty")
    assert z == expected  # an index in the LPS-reoriented volume, whatever the storage order
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_entropy_below_the_threshold_is_grey_not_white(tmp_path, monkeypatch):
    """A bright body with no uncertainty: the uncertainty panel must hold no white, which beside
    the colour bar would read as the top of the scale."""
    labels = pelvis()
    image = np.where(labels > 0, 1000.0, 0.0).astype(np.float32)
    entropy = np.zeros(SHAPE)
    entropy[band(labels == PROSTATE)] = 0.01  # below the threshold everywhere
    kept = []
    monkeypatch.setattr(figures.plt, "close", kept.append)
    path = tmp_path / "u.png"
    save_uncertainty_figure(image, entropy, np.diag([-1.5, -1.5, 2.0, 1.0]), path, prediction=labels,
                            class_names=CLASS_NAMES)
    figure = kept[0]
    panel = figure.axes[1]  # prediction, uncertainty, colour bar
    assert panel.get_title().startswith("uncertainty")
    pixels = matplotlib.image.imread(path)[..., :3]
    height = pixels.shape[0]
    x0, y0, x1, y1 = (panel.get_position().get_points() * [pixels.shape[1], height]).ravel()
    inside = pixels[int(height - y1) + 3:int(height - y0) - 3, int(x0) + 3:int(x1) - 3]
    whiteness = inside.min(axis=-1)  # white and light grey are high in all three channels
    assert inside.size and whiteness.max() < 0.7, f"a pixel at {whiteness.max():.2f} of white"
    assert whiteness.max() > 0.4  # the body is there, in mid grey
