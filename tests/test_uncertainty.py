"""uncertainty.py and figures.save_uncertainty_figure: entropy against scipy's, the NIfTI written on
an oblique LPS source grid, the boundary-band entropy against hand-counted voxels, the expected
Dice deficit (the flags' score) by hand and on built probability maps, the review rule on
constructed validation sets, and the two measures of how the score tracks errors.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_curve

from pelvicseg.evaluation import evaluate_volume, with_postprocessing
from pelvicseg.figures import save_uncertainty_figure
from monai.data import MetaTensor
from pelvicseg.uncertainty import (REVIEW_MARGIN, SCORE_NAME, UNCERTAINTY_SLOPE, describe_held_out, expected_dice_deficit,
                         fit_flag_thresholds, fit_from_volumes, flag_case, held_out_flags, normalised_entropy,
                         organ_uncertainty, rank_correlation, review_settings, voxel_error_auroc, write_uncertainty)

CLASS_NAMES = ("background", "body", "bladder")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- entropy

def test_entropy_is_zero_for_one_hot_and_one_for_uniform():
    num_classes = 6
    labels = torch.randint(0, num_classes, (5, 4, 3))
    one_hot = torch.nn.functional.one_hot(labels, num_classes).permute(3, 0, 1, 2).float()
    assert torch.equal(normalised_entropy(one_hot), torch.zeros(5, 4, 3))
    uniform = torch.full((num_classes, 5, 4, 3), 1 / num_classes)
    assert torch.allclose(normalised_entropy(uniform), torch.ones(5, 4, 3), atol=1e-6)


def test_entropy_matches_scipy_and_batches_along_dim_one():
    probabilities = torch.distributions.Dirichlet(torch.full((4,), 0.7)).sample((2, 3, 5, 6)).permute(0, 4, 1, 2, 3)
    expected = stats.entropy(probabilities.double().numpy(), axis=1) / math.log(4)  # natural log, / log C
    batched = normalised_entropy(probabilities, dim=1)
    assert batched.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(batched.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(normalised_entropy(probabilities[1]).numpy(), expected[1], atol=1e-5)


def test_entropy_is_finite_with_zero_probabilities_and_low_precision_input():
    probabilities = torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]).reshape(3, 3, 1, 1)
    entropy = normalised_entropy(probabilities.to(torch.bfloat16))
    assert entropy.dtype == torch.float32
    np.testing.assert_allclose(entropy.flatten().numpy(), [math.log(2) / math.log(3), 0.0, 0.0], atol=1e-6)


def test_entropy_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        normalised_entropy(torch.ones(1, 2, 2, 2))


# ----------------------------------------------------------------------------- NIfTI

def oblique_lps_affine() -> np.ndarray:
    """LPS axes, anisotropic spacing, rotated 20 degrees about the z axis, off-origin."""
    angle = math.radians(20)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.7, -1.3, 2.5])
    affine[:3, 3] = [101.5, 88.25, -42.0]
    return affine


@pytest.mark.parametrize("trailing_singleton", [False, True])
def test_uncertainty_nifti_keeps_the_source_geometry(tmp_path, trailing_singleton):
    shape = (9, 7, 5)
    affine = oblique_lps_affine()
    source_data = np.random.default_rng(0).normal(size=shape + ((1,) if trailing_singleton else ())).astype(np.float32)
    source = nib.Nifti1Image(source_data, affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=2)
    source.header.set_xyzt_units("mm")
    source_path = tmp_path / "image.nii.gz"
    nib.save(source, str(source_path))
    source = nib.load(str(source_path))

    entropy = np.random.default_rng(1).uniform(size=shape)
    entropy[0, 0, 0], entropy[1, 0, 0] = 0.0, 1.0
    path = tmp_path / "case_uncertainty.nii.gz"
    write_uncertainty(entropy, source, path)

    written = nib.load(str(path))
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_allclose(written.get_qform(), affine, atol=1e-5)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine) == ("L", "P", "S")
    assert written.header.get_data_dtype() == np.uint8
    assert written.dataobj.slope == pytest.approx(1 / 255, rel=1e-6) and written.dataobj.inter == 0
    values = written.get_fdata()
    assert values.min() == 0.0 and values.max() <= 1.0 and values.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(values, entropy, atol=0.5 / 255 + 1e-6)
    assert UNCERTAINTY_SLOPE * 255 <= 1.0


def test_uncertainty_nifti_refuses_another_grid(tmp_path):
    source = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4))
    with pytest.raises(ValueError, match="does not match"):
        write_uncertainty(np.zeros((4, 4, 3)), source, tmp_path / "x.nii.gz")


# ----------------------------------------------------------------------------- organ score

def test_organ_score_is_the_mean_over_the_boundary_band():
    labels = np.zeros((14, 14, 14), dtype=np.uint8)
    labels[4:10, 4:10, 4:10] = 2  # a 6-voxel cube
    entropy = np.full(labels.shape, 0.1)
    entropy[4:10, 4:10, 4:10] = 0.3  # the cube's outer layer ...
    entropy[5:9, 5:9, 5:9] = 0.9  # ... around its interior, which the band must leave out
    # band: the cube's outer layer (6**3 - 4**3 = 152 voxels at 0.3) and the face-adjacent layer
    # outside it (6 faces of 6 x 6 = 216 voxels at 0.1; 6-connected dilation adds no edges or corners)
    expected = (152 * 0.3 + 216 * 0.1) / (152 + 216)
    scores = organ_uncertainty(entropy, labels, num_classes=3)
    assert np.isnan(scores[0]) and np.isnan(scores[1])  # background, and a class not predicted
    assert scores[2] == pytest.approx(expected)


def test_organ_score_does_not_count_the_array_edge_as_a_contour():
    labels = np.ones((6, 6, 6), dtype=np.uint8)
    labels[:, :, 3:] = 2  # class 1 fills the lower half and touches the array edge on five sides
    entropy = np.zeros(labels.shape)
    entropy[:, :, 2:4] = 0.5  # the one real contour: the two layers either side of z = 2.5
    entropy[0, :, :] = 1.0  # the array edge: high, but not a contour
    entropy[0, :, 2:4] = 0.5
    scores = organ_uncertainty(entropy, labels, num_classes=3)
    assert scores[1] == pytest.approx(0.5) and scores[2] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- expected Dice deficit

def two_class_probabilities(organ: np.ndarray) -> np.ndarray:
    """(2, *shape): the organ's probability map ``organ`` and the background's 1 - organ."""
    organ = np.asarray(organ, dtype=np.float32)
    return np.stack([1 - organ, organ])


def test_expected_dice_deficit_by_hand():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[:2, :2, :2] = 1  # 8 voxels
    organ = np.where(labels == 1, 0.5, 0.0)
    # sum(p m) = 8 x 0.5 = 4, sum(p) = 4, sum(m) = 8: soft Dice 2 x 4 / (4 + 8) = 2/3
    scores = expected_dice_deficit(two_class_probabilities(organ), labels)
    assert math.isnan(scores[0]) and scores[1] == pytest.approx(1 / 3)

    organ = np.where(labels == 1, 1.0, 0.0)
    organ[3, 3, :] = 0.5  # 4 voxels outside the mask at 0.5: sum(p) = 10, sum(p m) = 8, sum(m) = 8
    assert expected_dice_deficit(two_class_probabilities(organ), labels)[1] == pytest.approx(1 - 16 / 18)
    # sharp and matching: no deficit; torch input gives the same
    exact = torch.from_numpy(two_class_probabilities(labels == 1))
    assert expected_dice_deficit(exact, labels)[1] == pytest.approx(0.0, abs=1e-12)


def test_expected_dice_deficit_is_nan_for_an_organ_not_predicted_and_checks_shapes():
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    labels[1, 1, 1] = 1
    probabilities = np.full((3, 3, 3, 3), 1 / 3, dtype=np.float32)
    scores = expected_dice_deficit(probabilities, labels)
    assert np.isnan(scores[0]) and np.isnan(scores[2]) and np.isfinite(scores[1])
    with pytest.raises(ValueError, match="do not match"):
        expected_dice_deficit(probabilities[:, :2], labels)


def test_voxels_the_post_processing_removed_leave_the_organ_s_mass():
    raw = np.zeros((8, 4, 4), dtype=np.uint8)
    raw[:2, :2, :2] = 1  # the organ: 8 voxels at p = 1
    raw[6:, :2, :1] = 1  # an island of 4 voxels at p = 1, removed by the largest-component step
    labels = raw.copy()
    labels[6:] = 0
    probabilities = two_class_probabilities(raw == 1)
    # counted as the organ's: sum(p) = 12, sum(p m) = 8, sum(m) = 8, so 1 - 16/20
    assert expected_dice_deficit(probabilities, labels)[1] == pytest.approx(0.2)
    assert expected_dice_deficit(probabilities, labels, raw_labels=raw)[1] == pytest.approx(0.0, abs=1e-12)


SHAPE = (24, 24, 24)
BODY, BLADDER = (slice(2, 22),) * 3, (slice(6, 12),) * 3  # the bladder: a 6-voxel cube, 216 voxels


def built_case(edge: float, confidence: float = 0.999):
    """Labels and probabilities (3 classes) of a clean prediction: each voxel gives ``confidence``
    to its label (the rest split evenly), except the bladder's outer layer, whose voxels give
    ``edge`` to the bladder and the rest to the body, as at a soft but right contour."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[BODY] = 1
    labels[BLADDER] = 2
    probabilities = np.full((3,) + SHAPE, (1 - confidence) / 2)
    for c in range(3):
        probabilities[c][labels == c] = confidence
    layer = np.zeros(SHAPE, dtype=bool)
    layer[BLADDER] = True
    layer[7:11, 7:11, 7:11] = False
    probabilities[:, layer] = [[0.0], [1 - edge], [edge]]
    return labels, probabilities


def hand_deficit(probabilities: np.ndarray, labels: np.ndarray, c: int) -> float:
    """The definition written out: 1 - 2 sum(p m) / (sum(p) + sum(m))."""
    p, m = probabilities[c].astype(np.float64), (labels == c).astype(np.float64)
    return 1 - 2 * (p * m).sum() / (p.sum() + m.sum())


def built_validation():
    """Six clean validation volumes (edges 0.80 to 0.90), Dice of bladder 0.90 to 0.95, and the
    rule fitted on them (six cases: the median-plus-margin rule)."""
    scores, dice = [], []
    for i, edge in enumerate(np.linspace(0.80, 0.90, 6)):
        labels, probabilities = built_case(edge)
        scores.append(expected_dice_deficit(probabilities, labels))
        dice.append([np.nan, 0.97, 0.90 + 0.01 * i])
    return np.array(scores), np.array(dice), fit_flag_thresholds(np.array(scores), np.array(dice), CLASS_NAMES)


def test_a_clean_volume_is_not_flagged_and_wrong_organ_volumes_are():
    scores, _, rule = built_validation()
    bladder = rule["organs"]["bladder"]
    assert bladder["method"] == "margin"
    assert bladder["threshold"] == pytest.approx(np.median(scores[:, 2]) + 0.05)
    # a clean volume between the validation ones: no flag; its score is the definition's
    labels, probabilities = built_case(0.83)
    clean = expected_dice_deficit(probabilities, labels)
    assert clean[2] == pytest.approx(hand_deficit(probabilities, labels, 2))
    assert flag_case(clean, rule, CLASS_NAMES) == []

    # a wrong organ: a 5-voxel cube far from the bladder labelled bladder, with p 0.55 (diffuse
    # but winning the arg-max); true Dice 2 x 216 / (216 + 341) = 0.78
    labels, probabilities = built_case(0.85)
    island = (slice(14, 19),) * 3
    labels[island] = 2
    probabilities[(slice(None),) + island] = np.array([0.0, 0.45, 0.55])[:, None, None, None]
    wrong = expected_dice_deficit(probabilities, labels)
    assert wrong[2] == pytest.approx(hand_deficit(probabilities, labels, 2))
    assert [f["organ"] for f in flag_case(wrong, rule, CLASS_NAMES)] == ["bladder"]

    # a part of the bladder the arg-max missed far from its contour: the body wins by 0.55 to 0.45
    labels, probabilities = built_case(0.85)
    probabilities[(slice(None),) + island] = np.array([0.0, 0.55, 0.45])[:, None, None, None]
    missed = expected_dice_deficit(probabilities, labels)
    assert [f["organ"] for f in flag_case(missed, rule, CLASS_NAMES)] == ["bladder"]

    # the whole bladder at p about 0.5: the model does not believe its own contour
    labels, probabilities = built_case(0.5)
    probabilities[:, 7:11, 7:11, 7:11] = np.array([0.0, 0.48, 0.52])[:, None, None, None]
    doubtful = expected_dice_deficit(probabilities, labels)
    assert [f["organ"] for f in flag_case(doubtful, rule, CLASS_NAMES)] == ["bladder"]


def test_evaluate_volume_scores_what_the_training_fit_scores_after_post_processing():
    """evaluate_volume's score with the largest-component step (predict.py) equals the one the
    training fit selects for that step (``alternatives`` then ``with_postprocessing``)."""
    labels, probabilities = built_case(0.85)
    labels[16:19, 16:19, 16:19] = 2  # an island of bladder at p 0.9, which the step removes
    probabilities[:, 16:19, 16:19, 16:19] = np.array([0.0, 0.1, 0.9])[:, None, None, None]
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    grid = MetaTensor(torch.zeros(1, *SHAPE), affine=torch.as_tensor(affine),
                      meta={"original_affine": affine, "spatial_shape": np.array(SHAPE)})
    source = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), affine)
    target = labels.copy()
    target[16:19, 16:19, 16:19] = 1
    tensor = torch.from_numpy(probabilities.astype(np.float32))
    fitted = evaluate_volume(tensor, grid, source, list(CLASS_NAMES), target=target, hd95=False, alternatives=True)
    fitted = with_postprocessing(fitted, ["bladder"], list(CLASS_NAMES))
    predicted = evaluate_volume(tensor, grid, source, list(CLASS_NAMES), ["bladder"], target=target, hd95=False)
    assert predicted["uncertainty"][2] == pytest.approx(fitted["uncertainty"][2])
    assert predicted["dice"][2] == pytest.approx(1.0) and fitted["dice"][2] == pytest.approx(1.0)
    # the removed island's probability is not counted: the score is that of the clean volume
    clean_labels, clean_probabilities = built_case(0.85)
    clean_probabilities[:, 16:19, 16:19, 16:19] = np.array([0.0, 1.0, 0.0])[:, None, None, None]
    assert predicted["uncertainty"][2] == pytest.approx(hand_deficit(clean_probabilities, clean_labels, 2), abs=1e-6)
    # without the step the island is part of the delivered bladder, and scored with it
    raw = evaluate_volume(tensor, grid, source, list(CLASS_NAMES), target=target, hd95=False)
    assert raw["uncertainty"][2] == pytest.approx(hand_deficit(probabilities, labels, 2), abs=1e-6)
    assert raw["uncertainty"][2] != pytest.approx(predicted["uncertainty"][2], abs=1e-3)


def test_review_settings_name_the_score_so_an_older_rule_is_refitted():
    settings = review_settings(False, 0.5, ["bladder", "body"])
    assert settings == {"tta": False, "overlap": 0.5, "largest_component": ["bladder", "body"],
                        "score": SCORE_NAME}
    older = {"tta": False, "overlap": 0.5, "largest_component": ["bladder", "body"]}  # before the score was named
    assert older != settings



@pytest.mark.parametrize("stored, refitted", [("older", True), ("current", False)])
def test_predict_refits_a_rule_stored_without_the_score_name(tmp_path, monkeypatch, capsys, stored, refitted):
    """predict.review_rule_for on a run whose uncertainty.json was fitted before the score was named:
    its settings differ from this run's, so the validation volumes are evaluated again (revalidate,
    recorded here instead of predicting) and the rule is fitted on those; with the current settings
    the stored volumes are used as they are."""
    import predict
    from pelvicseg.inference import Member

    settings = review_settings(False, 0.5, ["bladder", "body"])
    written = dict(settings) if stored == "current" else {k: v for k, v in settings.items() if k != "score"}
    scores, dice = constructed_validation(8)
    volumes = [{"case": f"case_{n}", "patient": f"{n:03d}", "uncertainty": list(map(json_number, s)),
                "dice": list(map(json_number, d))} for n, (s, d) in enumerate(zip(scores, dice))]
    (tmp_path / "uncertainty.json").write_text(json.dumps({"settings": written, "volumes": volumes}))
    member = Member(str(tmp_path / "best.pt"), {}, {}, {"class_names": list(CLASS_NAMES)}, tmp_path, {"val": []})
    calls = []

    def revalidate(members, class_names, settings_now, segmenter):
        calls.append(settings_now)
        return [{**v, "uncertainty": [None, None, 0.5]} for v in volumes]  # other scores, as other settings give

    monkeypatch.setattr(predict, "revalidate", revalidate)
    rule = predict.review_rule_for([member], list(CLASS_NAMES), settings, segmenter=None)
    assert calls == ([settings] if refitted else [])
    assert rule["settings"] == settings
    printed = capsys.readouterr().out
    assert ("so it is refitted on the members' validation volumes" in printed) == refitted
    assert ("score unrecorded (an older version)" in printed) == refitted
    fitted_on = [[None, None, 0.5]] * len(volumes) if refitted else [v["uncertainty"] for v in volumes]
    assert rule["organs"]["bladder"]["median"] == pytest.approx(np.median([s[2] for s in fitted_on]))


def json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# ----------------------------------------------------------------------------- review rule

def constructed_validation(n_cases=20, seed=0):
    """bladder: Dice falls as the score rises, so the 5 lowest-Dice organs are the 5 highest scores;
    body: scored in only 5 cases (too few to fit)."""
    rng = np.random.default_rng(seed)
    bladder_scores = rng.permutation(np.linspace(0.05, 0.95, n_cases))
    bladder_dice = 0.95 - 0.4 * bladder_scores
    scores = np.full((n_cases, 3), np.nan)
    dice = np.full((n_cases, 3), np.nan)
    scores[:, 2], dice[:, 2] = bladder_scores, bladder_dice
    scores[:5, 1], dice[:5, 1] = [0.1, 0.2, 0.3, 0.4, 0.5], [0.99, 0.98, 0.97, 0.96, 0.95]
    return scores, dice


def test_fitted_threshold_flags_the_poor_validation_organs():
    scores, dice = constructed_validation()
    rule = fit_flag_thresholds(scores, dice, CLASS_NAMES)
    json.dumps(rule, allow_nan=False)  # stored with the run as plain JSON
    bladder = rule["organs"]["bladder"]
    poor = dice[:, 2] < np.quantile(dice[:, 2], 0.25)
    assert poor.sum() == 5 and bladder["n_poor"] == 5 and bladder["method"] == "youden"
    # the separating threshold is the midpoint between the 15th and 16th of 20 equally spaced scores
    step = 0.9 / 19
    assert bladder["threshold"] == pytest.approx(0.05 + 14.5 * step)
    assert bladder["sensitivity"] == 1.0 and bladder["specificity"] == 1.0 and bladder["youden_j"] == 1.0
    for case in range(len(scores)):
        flags = flag_case(scores[case], rule, CLASS_NAMES)
        assert [f["organ"] for f in flags if f["organ"] == "bladder"] == (["bladder"] if poor[case] else [])

    assert flag_case(np.array([np.nan, np.nan, bladder["threshold"] + 1e-3]), rule, CLASS_NAMES) == [
        {"organ": "bladder", "score": pytest.approx(bladder["threshold"] + 1e-3),
         "threshold": bladder["threshold"], "reason": "uncertain"}]
    assert flag_case(np.array([np.nan, np.nan, bladder["threshold"] - 1e-3]), rule, CLASS_NAMES) == []


def test_youden_threshold_agrees_with_the_roc_curve_when_scores_overlap():
    rng = np.random.default_rng(3)
    dice_column = rng.uniform(0.6, 0.95, 40)
    score_column = (0.95 - dice_column) + rng.normal(0, 0.08, 40)  # tracks errors, noisily
    scores, dice = np.full((40, 3), np.nan), np.full((40, 3), np.nan)
    scores[:, 2], dice[:, 2] = score_column, dice_column
    bladder = fit_flag_thresholds(scores, dice, CLASS_NAMES)["organs"]["bladder"]
    poor = dice_column < np.quantile(dice_column, 0.25)
    false_positive_rate, true_positive_rate, _ = roc_curve(poor, score_column)
    assert bladder["youden_j"] == pytest.approx(np.max(true_positive_rate - false_positive_rate))
    flagged = score_column > bladder["threshold"]
    assert bladder["sensitivity"] == pytest.approx(flagged[poor].mean())
    assert bladder["specificity"] == pytest.approx((~flagged[~poor]).mean())


def test_ties_in_youden_j_keep_the_higher_threshold_and_seven_cases_are_too_few():
    # good organs score 0.1 0.2 0.3 0.6 0.65 0.7, poor ones (the two lowest Dice) 0.5 and 0.9:
    # a cut at 0.4 finds both poor organs and flags 3 of 6 good (J = 0.5); a cut at 0.8 finds one
    # poor organ and no good one (J = 0.5); the tie goes to 0.8, which flags fewer
    organ_scores = np.array([0.1, 0.2, 0.3, 0.6, 0.65, 0.7, 0.5, 0.9])
    organ_dice = np.array([0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.70, 0.71])
    scores, dice = np.full((8, 3), np.nan), np.full((8, 3), np.nan)
    scores[:, 2], dice[:, 2] = organ_scores, organ_dice
    bladder = fit_flag_thresholds(scores, dice, CLASS_NAMES)["organs"]["bladder"]
    assert bladder["method"] == "youden" and bladder["threshold"] == pytest.approx(0.8)
    assert bladder["youden_j"] == pytest.approx(0.5)
    assert bladder["sensitivity"] == 0.5 and bladder["specificity"] == 1.0

    fewer = fit_flag_thresholds(scores[1:], dice[1:], CLASS_NAMES)["organs"]["bladder"]
    # seven scores 0.2 0.3 0.5 0.6 0.65 0.7 0.9: median 0.6, threshold 0.6 + 0.05
    assert fewer["method"] == "margin" and fewer["median"] == pytest.approx(0.6)
    assert fewer["threshold"] == pytest.approx(0.65)


def test_too_few_cases_fall_back_to_the_median_plus_margin():
    scores, dice = constructed_validation()
    rule = fit_flag_thresholds(scores, dice, CLASS_NAMES)
    body = rule["organs"]["body"]
    assert rule["margin"] == REVIEW_MARGIN == 0.05
    assert body["method"] == "margin" and body["n_scored"] == 5
    assert body["threshold"] == pytest.approx(0.35)  # 0.1 .. 0.5: median 0.3, plus 0.05
    assert body["dice_median"] == pytest.approx(0.97)  # 0.99 .. 0.95, what predict.py's "worse than validation" uses
    assert flag_case(np.array([np.nan, 0.36, np.nan]), {"organs": {"body": body}}, CLASS_NAMES)[0]["organ"] == "body"
    # within the margin of the typical validation case: no flag
    assert flag_case(np.array([np.nan, 0.34, np.nan]), {"organs": {"body": body}}, CLASS_NAMES) == []


def test_a_score_that_does_not_separate_poor_organs_falls_back_to_the_margin():
    # eight cases, the two poorest with the two lowest scores: no cut has J > 0
    organ_scores = np.array([0.01, 0.02, 0.10, 0.11, 0.12, 0.13, 0.14, 0.15])
    organ_dice = np.array([0.50, 0.55, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95])
    scores, dice = np.full((8, 3), np.nan), np.full((8, 3), np.nan)
    scores[:, 2], dice[:, 2] = organ_scores, organ_dice
    bladder = fit_from_volumes([{"uncertainty": list(s), "dice": list(d)} for s, d in zip(scores, dice)],
                               CLASS_NAMES)["organs"]["bladder"]
    assert bladder["method"] == "margin" and bladder["threshold"] == pytest.approx(0.115 + 0.05)


def test_an_organ_predicted_in_every_validation_case_is_flagged_when_missing():
    scores, dice = constructed_validation()
    rule = fit_flag_thresholds(scores, dice, CLASS_NAMES)
    assert rule["organs"]["bladder"]["expected"] and not rule["organs"]["body"]["expected"]
    flags = flag_case(np.array([np.nan, np.nan, np.nan]), rule, CLASS_NAMES)
    assert flags == [{"organ": "bladder", "score": None, "threshold": rule["organs"]["bladder"]["threshold"],
                      "reason": "not predicted"}]


def bladder_records(patients_and_scores, with_patients=True):
    """Validation records with only the bladder (index 2) scored; Dice 0.9 except where the score is 0.40."""
    records = []
    for patient, scores in patients_and_scores:
        for week, score in enumerate(scores):
            record = {"case": f"Case_{patient}_Week{week}", "uncertainty": [None, None, score],
                      "dice": [None, None, 0.6 if score == 0.40 else 0.9]}
            if with_patients:
                record["patient"] = patient
            records.append(record)
    return records


def test_held_out_flags_fit_each_validation_patient_on_the_others():
    # patient 001 held out: fitted on 002 alone, median 0.21 + 0.05 = 0.26, so 0.40 is flagged and 0.20, 0.21
    # are not; 002 held out: fitted on 001, median 0.21, threshold 0.26: 0.20, 0.21, 0.22 are not flagged
    held_out = held_out_flags(bladder_records([("001", [0.20, 0.21, 0.40]), ("002", [0.20, 0.21, 0.22])]),
                              CLASS_NAMES)
    assert held_out == {"held_out": "patient", "n_volumes": 6, "n_flagged_volumes": 1, "n_organs": 6,
                        "n_flagged_organs": 1, "flagged": [{"case": "Case_001_Week2", "organ": "bladder", "dice": 0.6}]}
    assert describe_held_out(held_out) == ("it flags 1 of 6 validation volume(s) (1 of 6 organs), each fitted "
                                           "without that patient")


def test_held_out_flags_by_patient_keep_a_patient_s_weeks_out_of_its_own_fit():
    # patient 002 is less certain in all four weeks. Held out by patient: fitted on 001 (median 0.205, threshold
    # 0.255) all four are flagged. Held out one volume at a time, its other weeks stay in the fit (median of
    # 0.20, 0.21 and three of 0.30..0.33 is >= 0.30, threshold >= 0.35): none is.
    patients = [("001", [0.20, 0.21]), ("002", [0.30, 0.31, 0.32, 0.33])]
    by_patient = held_out_flags(bladder_records(patients), CLASS_NAMES)
    by_volume = held_out_flags(bladder_records(patients, with_patients=False), CLASS_NAMES)
    assert (by_patient["held_out"], by_patient["n_flagged_volumes"]) == ("patient", 4)
    assert {f["case"] for f in by_patient["flagged"]} == {f"Case_002_Week{w}" for w in range(4)}
    assert (by_volume["held_out"], by_volume["n_flagged_volumes"], by_volume["flagged"]) == ("volume", 0, [])
    # one patient: nothing to hold out
    assert held_out_flags(bladder_records([("001", [0.20, 0.21, 0.22])]), CLASS_NAMES) is None
    assert "no held-out flag rate" in describe_held_out(None)
    # the fit stores it, for uncertainty.json and summary.json
    assert fit_from_volumes(bladder_records(patients), CLASS_NAMES)["held_out"] == by_patient


# ----------------------------------------------------------------------------- measures

def test_voxel_error_auroc_counts_only_voxels_in_the_body():
    target = np.zeros((4, 4, 4), dtype=np.uint8)
    prediction = target.copy()
    prediction[0, :2] = 1  # 8 wrong voxels
    entropy = np.full(target.shape, 0.2)
    entropy[0, :2] = 0.9
    body = np.ones(target.shape, dtype=bool)
    body[3] = False
    prediction[3, :3] = 1  # wrong but certain, outside the body
    entropy[3] = 0.0
    assert voxel_error_auroc(entropy, prediction, target, body) == pytest.approx(1.0)
    assert voxel_error_auroc(entropy, prediction, target) < 1.0
    assert voxel_error_auroc(1 - entropy, prediction, target, body) == pytest.approx(0.0)
    assert math.isnan(voxel_error_auroc(entropy, target, target, body))


def test_rank_correlation_skips_undefined_pairs():
    scores = np.array([[0.1, np.nan], [0.2, 0.5], [0.3, 0.6], [0.4, np.nan]])
    dice = np.array([[0.9, 0.7], [0.8, np.nan], [0.7, 0.05], [0.1, 0.2]])
    # finite pairs (0.1, 0.9) (0.2, 0.8) (0.3, 0.7) (0.4, 0.1) (0.6, 0.05): ranks exactly reversed
    assert rank_correlation(scores, dice) == pytest.approx(-1.0)
    assert rank_correlation(scores[:, 0], dice[:, 0]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(scores[:2, 0], dice[:2, 0]))


# ----------------------------------------------------------------------------- figure

@pytest.mark.parametrize("axcodes, flip_z", [("LPS", False), ("RAS", True)])
def test_uncertainty_figure_shows_the_most_uncertain_axial_slice(tmp_path, axcodes, flip_z):
    shape = (12, 10, 8)
    affine = np.diag([-1.5, -1.5, 2.0, 1.0]) if axcodes == "LPS" else np.diag([1.5, 1.5, -2.0, 1.0])
    assert "".join(nib.aff2axcodes(affine)) == ("LPS" if axcodes == "LPS" else "RAI")
    entropy = np.zeros(shape)
    entropy[3:7, 3:7, 2] = 0.8
    entropy[5, 5, 6] = 1.0  # a single voxel: less summed uncertainty than slice 2
    image = np.random.default_rng(0).uniform(size=shape)
    prediction = (entropy > 0).astype(np.uint8) * 2
    path = tmp_path / "figures" / "case_uncertainty.png"
    z = save_uncertainty_figure(image, entropy, affine, path, prediction=prediction, class_names=CLASS_NAMES,
                                title="case")
    assert z == (shape[2] - 1 - 2 if flip_z else 2)  # an I-to-S flip reverses the axial order
    assert path.read_bytes()[:8] == PNG_MAGIC
    alone = tmp_path / "alone.png"
    assert save_uncertainty_figure(image, entropy, affine, alone) == z
    assert alone.read_bytes()[:8] == PNG_MAGIC


def test_predict_flags_every_organ_scoring_above_thresholds_refitted_on_lower_scores(tmp_path, capsys):
    """predict.py with a seeded untrained network whose run stored validation scores of 0 (the
    settings predict.py runs with, so nothing is revalidated): each organ's threshold is the median
    0 plus the margin, and every organ of the case scoring above it is flagged, or, predicted in
    every validation volume but not here, flagged as not predicted; worked out from metrics.csv.
    A cheap check (seconds) of the flag path that the mutation canary plants 'flags = []' in."""
    import csv

    import predict
    from conftest import AFFINE, write_case
    from dataset import CLASS_NAMES as NAMES
    from modules import ImprovedUNet3D
    from pelvicseg.checkpoint import save_checkpoint
    from pelvicseg.cli import run_cli

    torch.manual_seed(0)
    model_args = {"in_channels": 1, "out_channels": len(NAMES), "channels": [4, 8, 8, 8]}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint({"model": ImprovedUNet3D(**model_args).state_dict(), "model_args": model_args,
                     "class_names": list(NAMES), "config": {"spacing": [float(s) for s in np.abs(np.diag(AFFINE)[:3])],
                                                            "roi_size": [32, 32, 16], "class_names": list(NAMES)}},
                    run_dir / "best.pt")
    volumes = [{"case": f"Case_00{n}_Week0", "patient": f"00{n}", "uncertainty": [0.0] * len(NAMES),
                "dice": [1.0] * len(NAMES)} for n in (1, 2, 3)]
    (run_dir / "uncertainty.json").write_text(json.dumps({"settings": review_settings(False, 0.5, []),
                                                          "volumes": volumes}))
    image, _ = write_case(tmp_path / "data", 4, 0)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(predict.main, predict.get_args(["--checkpoint", str(run_dir), "--input", str(image), "--out",
                                                   str(out), "--device", "cpu", "--no-figures", "--no-hd95"])) == 0
    printed = capsys.readouterr().out
    assert "refitted" not in printed
    with open(out / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["class"] != "background"]
    scores = {row["class"]: float(row["uncertainty"] or "nan") for row in rows}
    expected = {organ for organ, score in scores.items() if score > REVIEW_MARGIN or math.isnan(score)}
    assert expected, scores  # an untrained network is unsure of its organs: the test sees a missing flag
    summary = json.loads((out / "summary.json").read_text())
    assert {f["organ"] for f in summary["flagged"]} == expected
    assert {row["class"] for row in rows if row["flagged"] == "1"} == expected
    assert "Flagged for review: 1 of 1 case(s)" in printed
