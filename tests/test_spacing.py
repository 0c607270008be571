"""Physical scale: every volume is resampled to one voxel spacing in mm, whatever its protocol.

The phantom draws its anatomy in millimetres, so the same patient written at another spacing or
with a cropped field of view has the same organs in mm; after preprocessing they must span the
same number of voxels. A short training then shows that a model predicts a re-gridded copy of
its test patients (finer in-plane, thicker slices, field of view cropped) about as well as the
native scans.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pelvicseg import phantom
import predict
import train
from pelvicseg.cli import run_cli
from dataset import find_cases, preprocessing

TARGET = (7.0, 7.0, 8.0)  # mm, coarse enough for tests to be quick


def write_pair(folder: Path, image, label, affine, patient=4) -> None:
    for sub in ("semantic_MRs_anon", "semantic_labels_anon"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    phantom.save_nifti(image, affine, folder / "semantic_MRs_anon" / f"Case_{patient:03d}_Week0_LFOV.nii.gz")
    phantom.save_nifti(label, affine, folder / "semantic_labels_anon" / f"Case_{patient:03d}_Week0_SEMANTIC_LFOV.nii.gz")


def preprocessed(folder: Path):
    return preprocessing(TARGET)(find_cases(folder)[0].as_dict())


def world_extent(label: np.ndarray, affine: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) world coordinates in mm of a class's voxel centres, by hand."""
    index = np.argwhere(label == class_id)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def test_two_spacings_and_a_cropped_field_of_view_give_the_same_physical_voxels(tmp_path):
    native = phantom.make_case(4, 0, shape=(64, 64, 32), seed=0)
    # the same patient at 1.5x finer in-plane and 1.33x thicker slices, field of view cropped to 75 % in-plane
    other = phantom.crop_field_of_view(*phantom.make_case(4, 0, shape=(96, 96, 24), seed=0), (0.75, 0.75, 1.0))
    items = []
    for name, (image, label, affine) in {"native": native, "other": other}.items():
        write_pair(tmp_path / name, image, label, affine)
        items.append(preprocessed(tmp_path / name))
    for item, (image, _, _) in zip(items, (native, other)):
        spacing = np.sqrt((np.asarray(item["image"].affine)[:3, :3] ** 2).sum(axis=0))
        # round(n x spacing / target) voxels over the same field of view: within half a voxel of the target
        np.testing.assert_allclose(spacing, TARGET, rtol=0.5 / min(item["image"].shape[1:]) + 1e-6)
    assert items[0]["image"].shape[1:] != items[1]["image"].shape[1:]  # their own fields of view, not one size
    sources = (native, other)
    for class_id in (2, 3, 4, 5):  # the body is cut by the smaller field of view; the organs are not
        middles = []
        for item, (_, source_label, source_affine) in zip(items, sources):
            label, affine = item["label"].as_tensor()[0].numpy(), np.asarray(item["label"].affine)
            low, high = world_extent(label, affine, class_id)
            source_low, source_high = world_extent(source_label, source_affine, class_id)
            voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            source_voxel = np.sqrt((source_affine[:3, :3] ** 2).sum(axis=0))
            # the organ's outer extent in mm (voxel centres plus one voxel) survives resampling within one voxel
            outer, source_outer = np.abs(high - low) + voxel, np.abs(source_high - source_low) + source_voxel
            assert np.all(np.abs(outer - source_outer) <= voxel + 1e-6), (class_id, outer, source_outer)
            middles.append((low + high) / 2)
        # and it sits at the same place in both protocols, within one target voxel
        assert np.all(np.abs(middles[0] - middles[1]) <= np.asarray(TARGET) + 1e-6), (class_id, middles)


def test_more_slices_over_a_larger_extent_are_not_squashed(tmp_path):
    """HipMRI's Case_019_Week1: 144 slices at the usual spacing, where others have 128."""
    image, label, affine = phantom.make_case(4, 0, shape=(48, 48, 32), seed=0)
    longer_image = np.concatenate([image, image[..., -4:]], axis=2)  # 36 slices at the same spacing
    longer_label = np.concatenate([label, label[..., -4:]], axis=2)
    write_pair(tmp_path / "usual", image, label, affine)
    write_pair(tmp_path / "longer", longer_image, longer_label, affine)
    usual, longer = preprocessed(tmp_path / "usual"), preprocessed(tmp_path / "longer")
    z_spacing = [float(np.linalg.norm(np.asarray(item["image"].affine)[:3, 2])) for item in (usual, longer)]
    assert z_spacing[0] == pytest.approx(z_spacing[1], rel=0.03)  # the same voxel height, not a squashed one
    z_mm = 32 * abs(affine[2, 2])
    assert usual["image"].shape[3] == round(z_mm / TARGET[2])
    assert longer["image"].shape[3] == round(36 / 32 * z_mm / TARGET[2])
    # the organs are where they were in mm, within one target voxel (those not in the copied slices)
    for class_id in [c for c in (1, 2, 3, 4, 5) if not (label[..., -4:] == c).any()]:
        ends = [world_extent(item["label"].as_tensor()[0].numpy(), np.asarray(item["label"].affine), class_id)
                for item in (usual, longer)]
        np.testing.assert_allclose(ends[0][0], ends[1][0], atol=max(TARGET) + 1e-6)
        np.testing.assert_allclose(ends[0][1], ends[1][1], atol=max(TARGET) + 1e-6)


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """A short CPU training on a native phantom (40 x 40 x 20, about 10.8 x 10.8 x 10 mm), and a copy
    of the same patients taken with another protocol: 1.5x finer in-plane, 1.33x thicker slices,
    field of view cropped to 75 % in-plane. (The README's demo measures the same at full size.)
    Eight epochs: the body is learned by then (test Dice 0.91 native, 0.90 the other copy, on this
    2-core CPU; 0.93 and 0.93 after 15 epochs). The scripts' entry points run in this process."""
    base = tmp_path_factory.mktemp("protocols")
    phantom.write_phantom(base / "native", patients=5, weeks=2, shape=(40, 40, 20), seed=0)
    phantom.write_phantom(base / "other", patients=5, weeks=2, shape=(60, 60, 15), seed=0, fov=(0.75, 0.75, 1.0))
    assert run_cli(train.main, train.get_args([
        "--data-root", str(base / "native"), "--out", str(base / "run"), "--spacing", "10", "10", "10", "--channels",
        "8", "16", "32", "64", "--lr", "3e-3", "--epochs", "8", "--patience", "8", "--workers", "0",
        "--device", "cpu"])) == 0
    dice = {}
    for copy in ("native", "other"):
        assert run_cli(predict.main, predict.get_args([
            "--checkpoint", str(base / "run"), "--data-root", str(base / copy), "--split", "test", "--out",
            str(base / f"pred_{copy}"), "--device", "cpu", "--no-figures", "--no-hd95"])) == 0
        dice[copy] = json.loads((base / f"pred_{copy}" / "summary.json").read_text())["per_class_dice"]
    return dice


def test_another_protocol_of_the_same_patients_scores_like_the_native_scans(protocol_run):
    """Within 0.05 Dice per class on the classes the short training has learned (Dice >= 0.5 on the
    native scans; the body at least), so the comparison cannot pass on zeros alone."""
    native, other = protocol_run["native"], protocol_run["other"]
    learned = [name for name, value in native.items() if name != "background" and value is not None and value >= 0.5]
    assert "body" in learned, native
    for name in learned:
        assert other[name] is not None and abs(other[name] - native[name]) <= 0.05, (name, native, other)
