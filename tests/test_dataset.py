"""The loader (dataset.py) on small NIfTI files written into temporary folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from dataset import (DataError, augmentation, class_weights_from_counts, find_cases, load_or_make_split,
                     preprocessing, split_patients)

NATIVE_SPACING = (1.7, 1.7, 1.56)  # conftest's AFFINE: preprocessing at this spacing keeps the array


def spacing_for(size, shape=(24, 20, 16)):
    """The spacing that turns conftest's volume (``shape`` at NATIVE_SPACING) into ``size`` voxels."""
    return tuple(d * n / m for d, n, m in zip(NATIVE_SPACING, shape, size))


def names(cases):
    return [(Path(c.image).name, Path(c.label).name if c.label else None) for c in cases]


# ----------------------------------------------------------------------------- finding and pairing

def test_find_cases_public_layout(public_root):
    cases = find_cases(public_root)
    assert [(c.patient, c.week) for c in cases] == [(p, w) for p in ("004", "005", "006") for w in (0, 1)]
    assert names(cases)[0] == ("Case_004_Week0_LFOV.nii.gz", "Case_004_Week0_SEMANTIC_LFOV.nii.gz")
    assert cases[0].case_id == "Case_004_Week0"
    assert all(Path(c.image).parent.name == "semantic_MRs_anon" for c in cases)
    assert all(Path(c.label).parent.name == "semantic_labels_anon" for c in cases)


def test_find_cases_course_layout(course_root):
    cases = find_cases(course_root)
    assert len(cases) == 6
    assert names(cases)[-1] == ("K006_Week1_LFOV.nii.gz", "K006_Week1_SEMANTIC.nii.gz")
    assert cases[-1].case_id == "K006_Week1"
    assert all(Path(c.label).parent.name == "semantic_labels_only" for c in cases)


@pytest.mark.parametrize("layout", ["public", "course"])
def test_pairing_is_by_patient_and_week_not_position(tmp_path, hipmri, layout, caplog):
    # Sorted position would pair wrongly: a label is missing in the middle and an extra label
    # (patient 9) has no image, so the i-th image and the i-th label differ from case 005/0 on.
    for patient, week in [(4, 0), (4, 1), (5, 0), (5, 1), (6, 0)]:
        hipmri.write_case(tmp_path, patient, week, layout, write_label=(patient, week) != (4, 1))
    hipmri.write_case(tmp_path, 9, 2, layout, write_image=False)
    hipmri.write_case(tmp_path, 3, 0, layout, write_image=False)  # sorts before everything
    with caplog.at_level(logging.WARNING, logger="hipmri"):
        cases = find_cases(tmp_path)
    assert [(c.patient, c.week) for c in cases] == [("004", 0), ("005", 0), ("005", 1), ("006", 0)]
    for case in cases:
        image_key = dataset.NAME_PATTERN.match(Path(case.image).name)
        label_key = dataset.NAME_PATTERN.match(Path(case.label).name)
        assert (int(image_key["patient"]), image_key["week"]) == (int(label_key["patient"]), label_key["week"])
        assert label_key["semantic"] and not image_key["semantic"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    image_name, _ = hipmri.case_paths(tmp_path, 4, 1, layout)
    _, extra_label = hipmri.case_paths(tmp_path, 9, 2, layout)
    _, early_label = hipmri.case_paths(tmp_path, 3, 0, layout)
    assert any(image_name.name in w and "without label" in w for w in warnings)
    assert any(extra_label.name in w and "without image" in w for w in warnings)
    assert any(early_label.name in w and "without image" in w for w in warnings)


def test_unlabelled_images_kept_for_prediction(tmp_path, hipmri):
    hipmri.write_case(tmp_path, 4, 0)
    hipmri.write_case(tmp_path, 5, 0, write_label=False)
    cases = find_cases(tmp_path, require_labels=False)
    assert [(c.patient, c.label is None) for c in cases] == [("004", False), ("005", True)]
    assert "label" not in cases[1].as_dict()


def test_second_file_for_one_key_is_an_error(tmp_path, hipmri):
    hipmri.write_case(tmp_path, 4, 0, "public")
    image, _ = hipmri.write_case(tmp_path, 4, 0, "course")  # same patient and week, other layout
    with pytest.raises(DataError, match="a second file for patient 004 week 0"):
        find_cases(tmp_path)


def test_files_that_are_not_hipmri_are_ignored(tmp_path, hipmri):
    hipmri.write_case(tmp_path, 4, 0)
    (tmp_path / "semantic_MRs_anon" / "notes.txt").write_text("scanner notes")
    (tmp_path / "semantic_MRs_anon" / "._Case_004_Week0_LFOV.nii.gz").write_bytes(b"\0\5\26\7")  # macOS junk
    (tmp_path / "semantic_MRs_anon" / "Case_004_Week0_LFOV.nii.gz.bak").write_bytes(b"old")
    assert len(find_cases(tmp_path)) == 1


# ----------------------------------------------------------------------------- loading

def test_odd_shape_and_4d_singleton_keep_their_physical_size(tmp_path, hipmri):
    """Volumes keep their own field of view: 18 slices at the same spacing (like Case_019_Week1's
    144 slices) give more slices, not the same number squashed."""
    hipmri.write_case(tmp_path, 4, 0)
    hipmri.write_case(tmp_path, 5, 0, shape=(26, 20, 18))  # like Case_019_Week1's 144 slices
    image, label = hipmri.synthetic_case(hipmri.SHAPE, seed=7)
    hipmri.write_case(tmp_path, 6, 0, image=image[..., None], label=label[..., None])  # trailing 4th dim
    image_path, _ = hipmri.case_paths(tmp_path, 6, 0)
    import nibabel as nib
    assert nib.load(str(image_path)).shape == (*hipmri.SHAPE, 1)  # really stored 4D
    transform = preprocessing((3.4, 3.4, 3.12))  # half resolution
    expected = {"Case_004_Week0": (1, 12, 10, 8), "Case_005_Week0": (1, 13, 10, 9), "Case_006_Week0": (1, 12, 10, 8)}
    for case in find_cases(tmp_path):
        item = transform(case.as_dict())
        assert item["image"].shape == expected[case.case_id], case.case_id
        assert item["label"].shape == expected[case.case_id], case.case_id
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.float32
        assert torch.isfinite(item["image"]).all()
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert set(item["label"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_float_labels_load(tmp_path, hipmri):
    hipmri.write_case(tmp_path, 4, 0, label_dtype=np.float32)
    hipmri.write_case(tmp_path, 5, 0, label_dtype=np.float64)
    for case in find_cases(tmp_path):
        item = preprocessing(NATIVE_SPACING)(case.as_dict())
        _, original = hipmri.synthetic_case(hipmri.SHAPE, int(case.patient) * 100)
        # same size, so nearest resizing is the identity and the values survive exactly
        np.testing.assert_array_equal(item["label"][0].numpy(), original.astype(np.float32))


def test_lps_volume_keeps_its_array_order(tmp_path, hipmri):
    """Orientation LPS is HipMRI's own: preprocessing must not flip the stored array."""
    image_path, _ = hipmri.write_case(tmp_path, 4, 0)
    case = find_cases(tmp_path)[0]
    item = preprocessing(NATIVE_SPACING)(case.as_dict())
    _, label = hipmri.synthetic_case(hipmri.SHAPE, 400)
    np.testing.assert_array_equal(item["label"][0].numpy(), label)


@pytest.mark.parametrize("size", [(16, 16, 16), (33, 17, 20)])
def test_resized_labels_keep_their_classes(tmp_path, hipmri, size):
    """Nearest neighbour only: whole numbers, and no class that was not there (1 next to 5 must
    never average to 3)."""
    image, label = hipmri.synthetic_case(hipmri.SHAPE, seed=3)
    label[label == 3] = 1  # no bladder: a linear resize would invent it between body and prostate
    label[label == 2] = 5
    hipmri.write_case(tmp_path, 4, 0, image=image, label=label)
    item = preprocessing(spacing_for(size))(find_cases(tmp_path)[0].as_dict())
    values = item["label"].as_tensor()
    assert values.shape == (1, *size)
    assert torch.equal(values, values.round())
    assert set(values.unique().tolist()) <= set(np.unique(label).tolist())
    assert set(values.unique().tolist()) == {0.0, 1.0, 4.0, 5.0}  # and none lost at this scale


def test_augmentation_keeps_patch_shape_and_label_values(tmp_path, hipmri):
    image, label = hipmri.synthetic_case(hipmri.SHAPE, seed=5)
    label[label == 3] = 1
    hipmri.write_case(tmp_path, 4, 0, image=image, label=label)
    item = preprocessing(NATIVE_SPACING)(find_cases(tmp_path)[0].as_dict())
    allowed = set(item["label"].unique().tolist())
    assert 3.0 not in allowed
    transform = augmentation((16, 16, 8))
    elastic = next(t for t in transform.transforms if type(t).__name__ == "Rand3DElasticd")
    deformed = 0
    for seed in range(12):
        transform.set_random_state(seed)
        output = transform(dict(item))
        outputs = output if isinstance(output, list) else [output]
        assert len(outputs) == 1
        patch = outputs[0]
        assert patch["image"].shape == (1, 16, 16, 8)
        assert patch["label"].shape == (1, 16, 16, 8)
        assert torch.isfinite(patch["image"]).all()
        values = patch["label"].as_tensor()
        assert set(values.unique().tolist()) <= allowed, f"seed {seed} invented classes"
        deformed += bool(elastic._do_transform)  # not invertible, so not in applied_operations
    # The elastic step (p = 0.3) ran at least once, so its nearest interpolation was exercised.
    assert deformed > 0


def test_device_augmentation_keeps_shape_and_label_values(tmp_path, hipmri):
    """train.py's default (--augment device) on a loaded volume: the batched warp samples labels
    nearest. No flip here, so the change seen is the warp's, not a mirror image."""
    image, label = hipmri.synthetic_case(hipmri.SHAPE, seed=6)
    label[label == 3] = 1
    hipmri.write_case(tmp_path, 4, 0, image=image, label=label)
    item = preprocessing(spacing_for((16, 16, 8)))(find_cases(tmp_path)[0].as_dict())
    images = torch.stack([item["image"].as_tensor()] * 2)
    labels = torch.stack([item["label"].as_tensor()] * 2)
    allowed = set(labels.unique().tolist())
    warp = dataset.DeviceAugmentation(elastic_prob=1.0, spatial_prob=1.0, elastic_magnitude=3.0, flip_prob=0.0)
    out_images, out_labels = warp(images, labels, torch.Generator().manual_seed(0))
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    assert torch.isfinite(out_images).all()
    assert not torch.equal(out_labels, labels)  # it really moved the anatomy
    assert not torch.equal(out_labels, labels.flip(2))  # and not by mirroring it
    assert set(out_labels.unique().tolist()) <= allowed


def asymmetric_labels(size=(12, 10, 8)) -> torch.Tensor:
    """Blocks of classes 1-5 placed so that no flip or transpose maps the volume onto itself."""
    label = torch.zeros(size)
    label[1:5, 1:4, 1:3] = 1
    label[6:11, 2:5, 4:7] = 2
    label[2:4, 6:9, 2:6] = 3
    label[8:10, 7:9, 0:2] = 4
    label[5, 5, 5] = 5
    return label


def test_device_augmentation_flip_is_left_right_only_and_moves_image_and_label_together():
    labels = torch.stack([asymmetric_labels()] * 32)[:, None]
    images = labels / 5 * 0.8 + 0.1  # the image is the label's picture: each follows the other
    for dim in (2, 3, 4):
        assert not torch.equal(labels.flip(dim), labels)  # so a flip about any axis would show
    always = dataset.DeviceAugmentation(spatial_prob=0.0, elastic_prob=0.0, flip_prob=1.0)
    out_images, out_labels = always(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out_labels, labels.flip(2))  # every sample, exactly; never flip(3) or flip(4)

    def follows(image, reference):
        """Correlation of an augmented image with a candidate source: intensity changes are
        monotone, so the true source correlates near 1 and a wrongly oriented one far less."""
        a, b = image.flatten() - image.mean(), reference.flatten() - reference.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    for index in range(len(images)):
        right = follows(out_images[index], images[index].flip(1))
        wrong = [follows(out_images[index], images[index].flip(d)) for d in (2, 3)] + [
            follows(out_images[index], images[index])]
        assert right > 0.95 and right > max(wrong) + 0.1, (index, right, wrong)

    never = dataset.DeviceAugmentation(spatial_prob=0.0, elastic_prob=0.0, flip_prob=0.0)
    assert torch.equal(never(images, labels, torch.Generator().manual_seed(0))[1], labels)

    half = dataset.DeviceAugmentation(spatial_prob=0.0, elastic_prob=0.0, flip_prob=0.5)
    out_images, out_labels = half(images, labels, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out_labels[i], labels[i].flip(1)) for i in range(len(labels))]
    assert all(f or torch.equal(out_labels[i], labels[i]) for i, f in enumerate(flipped))
    assert 0 < sum(flipped) < len(flipped)  # drawn per sample
    for index, was_flipped in enumerate(flipped):
        source = images[index].flip(1) if was_flipped else images[index]
        other = images[index] if was_flipped else images[index].flip(1)
        assert follows(out_images[index], source) > follows(out_images[index], other) + 0.1, index


def blob_centroids(labels: torch.Tensor, values) -> torch.Tensor:
    """Centre of mass, in voxels, of each label value in a (X, Y, Z) volume."""
    centres = []
    for value in values:
        points = (labels == value).nonzero().float()
        assert len(points) > 0, f"label {value} vanished"
        centres.append(points.mean(0))
    return torch.stack(centres)


def test_device_augmentation_rotation_moves_marked_points_rigidly_about_the_centre():
    """Rotation alone (no scaling, no elastic field, no flip): distances between four marked
    points and their distances to the patch centre are kept, and so is a block's volume; the
    points really move; the image turns with the label."""
    size = (40, 32, 24)
    axes = [torch.arange(s, dtype=torch.float32) for s in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    label = torch.zeros(size)
    markers = torch.tensor([[12.0, 10.0, 8.0], [28.0, 11.0, 9.0], [20.0, 23.0, 10.0], [19.0, 15.0, 17.0]])
    for value, centre in enumerate(markers, start=1):
        label[((grid - centre[:, None, None, None]) ** 2).sum(0) <= 2.5**2] = value
    label[14:24, 14:20, 10:14] = 5  # a 10 x 6 x 4 block: 240 voxels
    labels = torch.stack([label] * 4)[:, None]
    images = (labels > 0).float() * 0.8 + 0.1
    centre = torch.tensor([(s - 1) / 2 for s in size])
    before = blob_centroids(label, range(1, 5))
    torch.testing.assert_close(before, markers)

    rotate = dataset.DeviceAugmentation(rotate_range=0.5, scale_range=0.0, elastic_prob=0.0, spatial_prob=1.0,
                                        flip_prob=0.0)
    out_images, out_labels = rotate(images, labels, torch.Generator().manual_seed(3))
    moved = 0.0
    for index in range(len(labels)):
        after = blob_centroids(out_labels[index, 0], range(1, 5))
        torch.testing.assert_close(torch.cdist(after, after), torch.cdist(before, before), rtol=0, atol=0.6)
        torch.testing.assert_close((after - centre).norm(dim=1), (before - centre).norm(dim=1), rtol=0, atol=0.6)
        volume = int((out_labels[index, 0] == 5).sum())
        assert abs(volume - 240) <= 0.08 * 240, volume
        moved = max(moved, float((after - before).norm(dim=1).max()))
        # bilinear image and nearest label from one grid: the bright voxels are the labelled ones
        agree = ((out_images[index, 0] > 0.5) == (out_labels[index, 0] > 0)).float().mean()
        assert float(agree) > 0.97, float(agree)
    assert moved > 2.0, "the rotation left the markers where they were"


def test_device_augmentation_elastic_warp_keeps_label_values():
    """The elastic field alone, strong: labels are sampled nearest, so neighbours 1 and 5 never
    blend into a 3 and no value appears that was not there."""
    size = (24, 20, 16)
    label = torch.zeros(size)
    label[2:22, 2:18, 2:14] = 1
    label[6:18, 5:15, 4:12] = 5  # 5 inside 1: a linear sample on the border would give 2, 3 or 4
    label[10:14, 8:12, 6:10] = 0
    labels = torch.stack([label] * 4)[:, None]
    images = labels / 5
    warp = dataset.DeviceAugmentation(elastic_prob=1.0, spatial_prob=0.0, flip_prob=0.0, elastic_magnitude=4.0)
    out_images, out_labels = warp(images, labels, torch.Generator().manual_seed(0))
    assert out_labels.shape == labels.shape and out_images.shape == images.shape
    assert set(out_labels.unique().tolist()) <= {0.0, 1.0, 5.0}
    assert torch.isfinite(out_images).all()
    for index in range(len(labels)):
        changed = float((out_labels[index] != labels[index]).float().mean())
        assert changed > 0.01, f"sample {index}: the warp did not move the labels"
        assert not torch.equal(out_labels[index], labels[index].flip(1))
    # Each sample draws its own field.
    assert not torch.equal(out_labels[0], out_labels[1])


def test_device_augmentation_intensity_changes_only_images_within_their_ranges():
    """Gamma, scale, shift and noise, nothing spatial: labels come back untouched, and each image
    is out = scale * in**gamma + shift (+ noise) with the MONAI pipeline's ranges, recovered here
    from blocks of known intensity (0, 0.25, 0.5, 1)."""
    batch = 64
    image = torch.zeros(16, 16, 16)
    levels = (0.0, 0.25, 0.5, 1.0)
    for block, level in enumerate(levels):
        image[:, :, 4 * block:4 * block + 4] = level
    images = torch.stack([image] * batch)[:, None]
    labels = torch.stack([asymmetric_labels((16, 16, 16))] * batch)[:, None]
    augment = dataset.DeviceAugmentation(spatial_prob=0.0, elastic_prob=0.0, flip_prob=0.0)
    out_images, out_labels = augment(images, labels.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(out_labels, labels)

    gammas, scales, shifts, noisy = [], [], [], []
    for index in range(batch):
        blocks = [out_images[index, 0, :, :, 4 * b:4 * b + 4] for b in range(len(levels))]
        means = [float(b.mean()) for b in blocks]
        spread = max(float(b.std()) for b in blocks)
        shift = means[0]
        scale = means[3] - shift
        gamma = float(np.log((means[2] - shift) / scale) / np.log(0.5))
        assert means[1] == pytest.approx(scale * 0.25**gamma + shift, abs=0.006), index
        assert 0.9 - 0.005 <= scale <= 1.1 + 0.005, (index, scale)
        assert -0.1 - 0.005 <= shift <= 0.1 + 0.005, (index, shift)
        assert 0.7 - 0.03 <= gamma <= 1.5 + 0.03, (index, gamma)
        assert spread < 1e-4 or 0.02 < spread < 0.04, (index, spread)  # no noise, or noise of sd 0.03
        gammas.append(gamma)
        scales.append(scale)
        shifts.append(shift)
        noisy.append(spread > 1e-4)
    # Each change is drawn per sample: some samples get it, some do not.
    for name, changed in (("gamma", [abs(g - 1) > 0.03 for g in gammas]),
                          ("scale", [abs(s - 1) > 1e-4 for s in scales]),
                          ("shift", [abs(t) > 1e-4 for t in shifts]), ("noise", noisy)):
        assert 0 < sum(changed) < batch, name


# ----------------------------------------------------------------------------- split

def test_patient_split_sizes_disjoint_and_seeded():
    patients = [f"{p:03d}" for p in range(4, 14)]
    split = split_patients(patients + patients[:3], seed=0)  # several weeks per patient
    assert [len(split[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(split["train"] + split["val"] + split["test"]) == patients
    assert not set(split["train"]) & set(split["val"])
    assert not set(split["train"]) & set(split["test"])
    assert not set(split["val"]) & set(split["test"])
    assert split_patients(list(reversed(patients)), seed=0) == split  # input order does not matter
    others = [split_patients(patients, seed=s) for s in range(1, 6)]
    assert any(o != split for o in others)  # the seed really shuffles
    with pytest.raises(DataError, match="at least 3 patients"):
        split_patients(["004", "005"])


def test_split_of_cases_never_shares_a_patient(tmp_path, hipmri):
    hipmri.write_dataset(tmp_path / "data", patients=range(4, 14), weeks=(0, 1, 2), shape=(8, 8, 8))
    cases = find_cases(tmp_path / "data")
    split = load_or_make_split(cases, tmp_path / "run" / "splits.json", seed=3)
    parts = {k: dataset.cases_in(cases, split[k]) for k in ("train", "val", "test")}
    assert [len(parts[k]) for k in ("train", "val", "test")] == [18, 6, 6]
    patients = {k: {c.patient for c in v} for k, v in parts.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])


def test_split_file_written_and_reused(tmp_path, hipmri):
    hipmri.write_dataset(tmp_path / "data", patients=range(4, 14), weeks=(0,), shape=(8, 8, 8))
    cases = find_cases(tmp_path / "data")
    split_file = tmp_path / "run" / "splits.json"
    first = load_or_make_split(cases, split_file, seed=0)
    assert json.loads(split_file.read_text()) == first
    assert load_or_make_split(cases, split_file, seed=123) == first  # the file wins over the seed
    edited = {"train": first["train"][1:], "val": first["val"] + first["train"][:1], "test": first["test"]}
    split_file.write_text(json.dumps(edited))
    assert load_or_make_split(cases, split_file, seed=0) == edited
    split_file.write_text(json.dumps({"train": ["004"], "val": ["004"], "test": []}))
    with pytest.raises(DataError, match="two splits"):
        load_or_make_split(cases, split_file)
    split_file.write_text("{not json")
    with pytest.raises(DataError, match="not a valid split file"):
        load_or_make_split(cases, split_file)


# ----------------------------------------------------------------------------- class weights

def test_class_weights_favour_rare_classes():
    counts = np.array([603_500, 354_700, 33_700, 5_700, 1_400, 1_000])  # HipMRI's shares
    weights = class_weights_from_counts(counts, 0.5)
    assert weights.dtype == np.float32 and weights.shape == (6,)
    assert np.isclose(weights.mean(), 1.0, atol=1e-6)
    assert np.all(np.diff(weights) > 0)  # rarer -> larger, strictly
    assert weights[5] / weights[0] == pytest.approx(np.sqrt(603_500 / 1_000), rel=1e-4)


def test_class_weight_power_by_hand():
    counts = np.array([800, 100, 100])  # shares 0.8, 0.1, 0.1
    raw = np.array([0.8, 0.1, 0.1]) ** -0.25  # 1.0574, 1.7783, 1.7783
    np.testing.assert_allclose(class_weights_from_counts(counts, 0.25), raw / raw.mean(), rtol=1e-6)
    assert class_weights_from_counts(counts, 0.25)[1] == pytest.approx(1.7783 / ((1.0574 + 2 * 1.7783) / 3), rel=1e-3)
    np.testing.assert_allclose(class_weights_from_counts(counts, 0.0), 1.0)


def test_class_weights_absent_class_gets_largest_weight():
    weights = class_weights_from_counts(np.array([900, 90, 0, 10]), 0.5)
    assert np.isfinite(weights).all()
    assert weights[2] == pytest.approx(weights.max()) and weights[2] == pytest.approx(weights[3])
    assert np.allclose(class_weights_from_counts(np.zeros(3, dtype=np.int64), 0.5), 1.0)


def test_device_augmentation_rotation_is_rigid_on_a_non_cubic_patch():
    """A sphere rotated in a 48 x 48 x 24 patch stays a sphere (no shear from unequal axis lengths)."""
    import torch

    from dataset import DeviceAugmentation

    size = (48, 48, 24)
    axes = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    sphere = ((grid**2).sum(0) <= 8**2).float()[None, None]
    augment = DeviceAugmentation(rotate_range=0.6, scale_range=0.0, elastic_prob=0.0, spatial_prob=1.0,
                                 flip_prob=0.0)
    for seed in range(3):
        _, rotated = augment(sphere.clone(), sphere.clone(), torch.Generator().manual_seed(seed))
        mask = rotated[0, 0] > 0
        extents = [int(mask.any(dim=tuple(d for d in range(3) if d != axis)).sum()) for axis in range(3)]
        assert all(abs(e - 17) <= 2 for e in extents), extents
        assert abs(float(rotated.sum()) - float(sphere.sum())) / float(sphere.sum()) < 0.05
