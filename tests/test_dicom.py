"""DICOM in and out: series reading, RTSTRUCT and SEG round trips, one-line errors, dciodvfy.

Everything is written into temporary folders: the phantom's DICOM series (phantom.py --dicom)
at a coarse grid of about 3.7 mm, and small synthetic series in oblique and flipped geometry.
tests/test_dicom_study.py has the study folder as a scanner writes it (several series, skips,
multi-frame and compressed copies) and tests/test_dicom_series.py the series policy.
"""
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, generate_uid

from pelvicseg.dicom import outputs as dicom_io
import dicom_study
import phantom as phantom_cli
from pelvicseg import phantom
from scipy import ndimage
from dataset import CLASS_NAMES, DataError
from pelvicseg.figures import class_colours

COARSE = (118, 112, 54)  # 3.6 x 3.8 x 3.7 mm over the phantom's field of view; rows and columns differ
BODY = CLASS_NAMES.index("body")


def rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def ras_affine_from_lps(directions, spacing, origin):
    """The NIfTI (RAS) affine of a grid whose axes point along ``directions`` (LPS columns)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(directions) * np.asarray(spacing)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


OBLIQUE_DIRECTIONS = rotation(2, 20) @ rotation(0, -30)  # turned about the scanner's z, then tilted about x


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def copy_shuffled(files, folder, seed=0):
    """Copy a series under random names with InstanceNumbers in random order: neither may set the order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, numbers = rng.permutation(len(files)), rng.permutation(len(files)) + 1
    copies = []
    for path, name, number in zip(files, names, numbers):
        dataset = pydicom.dcmread(path)
        dataset.InstanceNumber = int(number)
        copy = folder / f"img_{name:04d}"
        dataset.save_as(copy, enforce_file_format=True)
        copies.append(copy)
    return copies


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    """Case_004_Week0 at COARSE, written by the phantom's CLI with --dicom."""
    root = tmp_path_factory.mktemp("phantom")
    phantom_cli.main(phantom_cli.get_args(["--out", str(root), "--patients", "1", "--weeks", "1",
                                   "--shape", *map(str, COARSE), "--dicom"]))
    image = nib.load(root / "semantic_MRs_anon" / "Case_004_Week0_LFOV.nii.gz")
    label = nib.load(root / "semantic_labels_anon" / "Case_004_Week0_SEMANTIC_LFOV.nii.gz")
    folder = root / "dicom" / "Case_004_Week0"
    series = dicom_io.find_series(folder)[0]
    return SimpleNamespace(root=root, folder=folder, nifti=image, image=image.get_fdata(dtype=np.float32),
                           labels=np.asarray(label.dataobj), series=series)


def small_series(folder, image=None, affine=None, **kwargs):
    """A 10 x 8 x 6 axial series (1.5 x 1.2 x 2.0 mm) with integer intensities."""
    if image is None:
        image = np.random.default_rng(1).integers(0, 4000, size=(10, 8, 6)).astype(np.float32)
    if affine is None:
        affine = ras_affine_from_lps(np.eye(3), (1.5, 1.2, 2.0), (-7.0, -4.0, 10.0))
    return phantom.write_dicom_series(image, affine, folder, "Synthetic_001", "small", **kwargs)


# ----------------------------------------------------------------------------- geometry

def test_phantom_series_tags_put_each_pixel_at_its_nifti_voxel(phantom_case):
    """The DICOM tags by hand: LPS = diag(-1, -1, 1) @ RAS, PixelSpacing is (between rows, between columns)."""
    affine = phantom_case.nifti.affine
    spacing_x, spacing_y, spacing_z = -affine[0, 0], -affine[1, 1], affine[2, 2]
    assert spacing_x != pytest.approx(spacing_y)  # so a swap would show
    first, second = (pydicom.dcmread(phantom_case.folder / name) for name in ("MR0001.dcm", "MR0002.dcm"))
    np.testing.assert_allclose([float(v) for v in first.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-12)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [spacing_y, spacing_x], rtol=1e-10)
    origin_lps = [-affine[0, 3], -affine[1, 3], affine[2, 3]]
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], origin_lps, atol=1e-9)
    np.testing.assert_allclose([float(v) for v in second.ImagePositionPatient],
                               np.add(origin_lps, [0, 0, spacing_z]), atol=1e-9)
    assert (first.Rows, first.Columns) == (COARSE[1], COARSE[0])
    np.testing.assert_array_equal(first.pixel_array, phantom_case.image[:, :, 0].T)


def test_series_in_shuffled_files_reads_back_the_nifti_volume_and_affine(phantom_case, tmp_path):
    folder = tmp_path / "Case_004_Week0_shuffled"
    copy_shuffled(sorted(phantom_case.folder.iterdir()), folder, seed=3)
    (series,) = dicom_io.find_series(folder)
    assert series.case_id == "Case_004_Week0_shuffled"
    assert series.shape == COARSE
    volume, affine = dicom_io.load_series(series)
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, phantom_case.image)
    np.testing.assert_allclose(affine, phantom_case.nifti.affine, atol=1e-6)

    written = nib.load(dicom_io.series_to_nifti(series, tmp_path / "out" / "case.nii.gz"))
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), phantom_case.image)
    np.testing.assert_allclose(written.affine, phantom_case.nifti.affine, atol=1e-5)
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 1
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")


def test_oblique_series_reads_back_onto_the_grid_it_was_written_from(tmp_path):
    spacing, origin = (1.1, 0.8, 2.5), (-30.0, 12.0, 40.0)
    affine = ras_affine_from_lps(OBLIQUE_DIRECTIONS, spacing, origin)
    image = np.random.default_rng(2).integers(0, 3000, size=(9, 7, 5)).astype(np.float32)
    files = phantom.write_dicom_series(image, affine, tmp_path / "written", "Synthetic_002", "oblique")
    header = pydicom.dcmread(files[0])
    np.testing.assert_allclose([float(v) for v in header.ImageOrientationPatient],
                               np.concatenate([OBLIQUE_DIRECTIONS[:, 0], OBLIQUE_DIRECTIONS[:, 1]]), atol=1e-12)
    np.testing.assert_allclose([float(v) for v in header.ImagePositionPatient], origin, atol=1e-9)
    copy_shuffled(files, tmp_path / "oblique")
    (series,) = dicom_io.find_series(tmp_path / "oblique")
    volume, read_affine = dicom_io.load_series(series)
    np.testing.assert_array_equal(volume, image)
    np.testing.assert_allclose(read_affine, affine, atol=1e-9)


def test_slices_stepping_against_the_normal_are_read_in_normal_order(tmp_path):
    """RAS array order, slices running inferior: the reader sorts along the normal (superior),
    so the slice axis comes back reversed and the origin moves to the last written slice."""
    spacing, origin_ras = (0.9, 1.3, 2.5), np.array([-5.0, 8.0, 30.0])
    affine = np.diag([*spacing, 1.0])
    affine[2, 2] = -spacing[2]
    affine[:3, 3] = origin_ras
    image = np.random.default_rng(4).normal(0, 50, size=(6, 5, 4)).astype(np.float32)  # signed, not integer
    copy_shuffled(phantom.write_dicom_series(image, affine, tmp_path / "written", "Synthetic_003", "flipped"),
                  tmp_path / "flipped")
    (series,) = dicom_io.find_series(tmp_path / "flipped")
    volume, read_affine = dicom_io.load_series(series)
    expected = np.diag([*spacing, 1.0])
    expected[:3, 3] = origin_ras + [0, 0, -3 * spacing[2]]
    np.testing.assert_allclose(read_affine, expected, atol=1e-9)
    slope = float(pydicom.dcmread(series.files[0]).RescaleSlope)
    np.testing.assert_allclose(volume, image[:, :, ::-1], atol=slope)


def test_rescale_slope_and_intercept_apply_per_slice(tmp_path):
    files = small_series(tmp_path / "series")
    stored = {}
    for k, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        stored[k] = dataset.pixel_array.T.astype(np.float64)
        if k % 2:
            dataset.RescaleSlope, dataset.RescaleIntercept = "2.5", "-100"
            dataset.save_as(path, enforce_file_format=True)
    volume, _ = dicom_io.load_series(dicom_io.find_series(tmp_path / "series")[0])
    for k in stored:
        expected = stored[k] * 2.5 - 100 if k % 2 else stored[k]
        np.testing.assert_allclose(volume[:, :, k], expected)


def test_several_series_in_one_folder_give_one_case_each(tmp_path):
    small_series(tmp_path / "study" / "a", uid_entropy=("a",), series_number=3)
    image = np.full((10, 8, 6), 7.0, dtype=np.float32)
    small_series(tmp_path / "study" / "b", image=image, uid_entropy=("b",), series_number=5)
    found = {s.series_number: s for s in dicom_io.find_series(tmp_path / "study")}
    assert sorted(found) == [3, 5]
    assert (found[3].case_id, found[5].case_id) == ("a", "b")  # one series per subfolder: the folder names
    np.testing.assert_array_equal(dicom_io.load_series(found[5])[0], image)
    # the same two series mixed in one folder: named by patient, series number and UID tail
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("a", "b"):
        for file in (tmp_path / "study" / sub).iterdir():
            (mixed / f"{sub}_{file.name}").write_bytes(file.read_bytes())
    found = {s.series_number: s for s in dicom_io.find_series(mixed)}
    assert re.fullmatch(r"Synthetic_001_3_\d{8}", found[3].case_id)
    assert re.fullmatch(r"Synthetic_001_5_\d{8}", found[5].case_id)
    np.testing.assert_array_equal(dicom_io.load_series(found[5])[0], image)


def test_is_dicom_folder_tells_dicom_from_nifti_folders(phantom_case, tmp_path):
    assert dicom_io.is_dicom_folder(phantom_case.folder)
    assert not dicom_io.is_dicom_folder(phantom_case.root / "semantic_MRs_anon")
    assert not dicom_io.is_dicom_folder(phantom_case.root)  # DICOM and NIfTI together
    assert not dicom_io.is_dicom_folder(phantom_case.folder / "MR0001.dcm")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image\n" * 20)
    assert not dicom_io.is_dicom_folder(tmp_path / "notes")
    # files without the 128-byte preamble are still found by reading their headers
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("MR0001.dcm", "MR0002.dcm"):
        dataset = pydicom.dcmread(phantom_case.folder / name)
        dataset.preamble, dataset.file_meta = None, FileMetaDataset()
        dataset.save_as(bare / name.replace(".dcm", ""), implicit_vr=True, little_endian=True)
    assert (bare / "MR0001").read_bytes()[128:132] != b"DICM"
    assert dicom_io.is_dicom_folder(bare)
    volume, _ = dicom_io.load_series(dicom_io.find_series(bare)[0])
    np.testing.assert_array_equal(volume, phantom_case.image[:, :, :2])


# ----------------------------------------------------------------------------- RTSTRUCT

def outline(labels):
    """What the EXTERNAL ROI holds: per slice, everything inside the outline of the labelled voxels."""
    filled = np.zeros(labels.shape, dtype=bool)
    for k in range(labels.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(labels[:, :, k] > 0)
    return filled


def test_rtstruct_round_trip_on_the_phantom_at_coarse_resolution(phantom_case, tmp_path):
    series, labels = phantom_case.series, phantom_case.labels
    path = dicom_io.write_rtstruct(labels, series, CLASS_NAMES, tmp_path / "Case_004_Week0_rtstruct.dcm")
    masks = dicom_io.read_rtstruct_masks(path, series)
    union = dicom_study.union_reader_masks(path, series)
    assert list(masks) == ["External", "Bone", "Bladder", "Rectum", "Prostate"]  # TG-263
    for number, name in enumerate(CLASS_NAMES[1:], start=1):
        expected = outline(labels) if number == BODY else labels == number
        mask = masks[dicom_io.roi_name(name)]
        assert dice(mask, expected) >= 0.95, name
        np.testing.assert_array_equal(mask, expected, err_msg=name)
        np.testing.assert_array_equal(union[dicom_io.roi_name(name)], expected, err_msg=name)


def test_rtstruct_references_the_series_and_puts_each_contour_on_its_slice(phantom_case, tmp_path):
    series, labels = phantom_case.series, phantom_case.labels
    path = dicom_io.write_rtstruct(labels, series, CLASS_NAMES, tmp_path / "rtstruct.dcm")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == series.study_uid and ds.PatientID == "Case_004"
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == series.frame_of_reference_uid
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == series.study_uid
    (referenced_series,) = study.RTReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == series.series_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced_series.ContourImageSequence} == set(
        series.sop_instance_uids)

    slice_z = {}
    for file in phantom_case.folder.iterdir():
        header = pydicom.dcmread(file, stop_before_pixels=True)
        slice_z[header.SOPInstanceUID] = float(header.ImagePositionPatient[2])
    z_of_k = sorted(slice_z.values())
    figure_rgb = [[int(hex_colour[n:n + 2], 16) for n in (1, 3, 5)] for hex_colour in class_colours(len(CLASS_NAMES))]
    rois = {int(roi.ROINumber): roi.ROIName for roi in ds.StructureSetROISequence}
    kinds = {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert rois == {1: "External", 2: "Bone", 3: "Bladder", 4: "Rectum", 5: "Prostate"}
    assert kinds == {1: "EXTERNAL", 2: "ORGAN", 3: "ORGAN", 4: "ORGAN", 5: "ORGAN"}
    for roi_contour in ds.ROIContourSequence:
        number = int(roi_contour.ReferencedROINumber)
        assert list(roi_contour.ROIDisplayColor) == figure_rgb[number]
        mask = labels > 0 if number == BODY else labels == number
        contoured_z = set()
        for contour in roi_contour.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert all(len(value.original_string) <= 16 for value in contour.ContourData)
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints >= 3
            z = slice_z[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            np.testing.assert_allclose(points[:, 2], z, atol=1e-3)
            contoured_z.add(round(z, 3))
        assert contoured_z == {round(z_of_k[k], 3) for k in np.flatnonzero(mask.any(axis=(0, 1)))}


def test_rtstruct_keeps_holes_islands_and_one_pixel_regions_on_an_oblique_grid(tmp_path):
    shape, spacing = (24, 20, 6), (3.7, 3.7, 3.7)
    affine = ras_affine_from_lps(OBLIQUE_DIRECTIONS, spacing, (-40.0, -30.0, 5.0))
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    radius = np.hypot(i - 8, j - 9)
    labels = np.zeros(shape, dtype=np.uint8)
    for k in (1, 2, 3):
        labels[:, :, k][(radius >= 3) & (radius <= 6)] = 1  # a ring: one outline and one hole
    labels[:, :, 3][radius <= 1] = 1  # an island inside the hole
    for k in (1, 2, 3, 4):
        labels[:, :, k][np.hypot(i - 18, j - 4) <= 2.5] = 2  # one organ in two pieces
        labels[:, :, k][np.hypot(i - 18, j - 15) <= 2] = 2
    labels[0, 0, 2] = labels[23, 19, 2] = 3  # one pixel each, in two corners of the image
    labels[20, 9:11, 2] = 3  # two pixels
    labels[14, 17, 4] = labels[15, 18, 4] = 3  # touching only at a corner
    names = ["background", "ring", "pair", "specks", "absent"]
    folder = tmp_path / "oblique"
    phantom.write_dicom_series(labels.astype(np.float32), affine, folder, "Synthetic_004", "shapes")
    (series,) = dicom_io.find_series(folder)
    path = dicom_io.write_rtstruct(labels, series, names, tmp_path / "shapes_rtstruct.dcm", external_class=None)
    masks = dicom_io.read_rtstruct_masks(path, series)  # the even-odd rule
    union = dicom_study.union_reader_masks(path, series)
    assert set(masks) == set(union) == {"ring", "pair", "specks"}  # "absent" has no voxel: left out
    for number, name in enumerate(names[1:4], start=1):
        expected = labels == number
        assert dice(masks[name], expected) >= 0.95, name
        np.testing.assert_array_equal(masks[name], expected, err_msg=name)
        np.testing.assert_array_equal(union[name], expected, err_msg=name)

    ds = pydicom.dcmread(path)
    contours_per_slice = {}
    for roi_contour in ds.ROIContourSequence:
        for contour in roi_contour.get("ContourSequence", []):
            k = series.sop_instance_uids.index(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            key = (names[roi_contour.ReferencedROINumber], k)
            contours_per_slice[key] = contours_per_slice.get(key, 0) + 1
    # the hole is cut into the ring's outline (a keyhole), the island inside it is its own contour
    assert contours_per_slice[("ring", 2)] == 1 and contours_per_slice[("ring", 3)] == 2
    assert contours_per_slice[("pair", 4)] == 2
    assert not any(name == "absent" for name, _ in contours_per_slice)
    assert ("ring", 0) not in contours_per_slice and ("ring", 4) not in contours_per_slice


def test_rtstruct_reader_refuses_another_frame_of_reference(phantom_case, tmp_path):
    path = dicom_io.write_rtstruct(phantom_case.labels, phantom_case.series, CLASS_NAMES, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(path)
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match="frame"):
        dicom_io.read_rtstruct_masks(path, phantom_case.series)


# ----------------------------------------------------------------------------- SEG

def test_seg_read_back_with_highdicom_equals_the_labels(phantom_case, tmp_path):
    series, labels = phantom_case.series, phantom_case.labels
    path = dicom_io.write_seg(labels, series, CLASS_NAMES, tmp_path / "Case_004_Week0_seg.dcm")
    seg = hd.seg.segread(path)
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert [seg.get_segment_description(n).segment_label for n in range(1, 6)] == [
        "External", "Bone", "Bladder", "Rectum", "Prostate"]  # the RTSTRUCT's names
    frames = seg.get_pixels_by_source_instance(list(series.sop_instance_uids), combine_segments=True,
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), labels)


def test_predicts_rtstruct_and_seg_read_back_by_geometry_alone_as_its_labels(tmp_path):
    """predict.py's DICOM step on an oblique series, read back by tests/dicom_readback.py: the SEG's
    frames placed by their own plane positions, the contours by their patient coordinates, both
    through the NIfTI affine the series was written from (nothing of pelvicseg/dicom/ reads)."""
    import dicom_readback
    import predict

    shape = (20, 16, 7)
    affine = ras_affine_from_lps(OBLIQUE_DIRECTIONS, (2.5, 2.0, 3.0), (-30.0, -20.0, 12.0))
    labels = np.zeros(shape, dtype=np.uint8)  # every class, none symmetric: a flip or a swap changes it
    labels[1:18, 1:15, 0:7] = 1
    labels[2:7, 2:5, 1:3] = 2
    labels[12:17, 3:8, 3:6] = 3
    labels[4:10, 10:14, 2:5] = 4
    labels[8:11, 5:7, 5:7] = 5
    folder = tmp_path / "oblique"
    phantom.write_dicom_series(labels.astype(np.float32), affine, folder, "Synthetic_005", "blocks")
    (series,) = dicom_io.find_series(folder)
    entry = {}
    predict.write_dicom_outputs(labels, series, ["rtstruct", "seg"], CLASS_NAMES, tmp_path / "out", entry)

    seg, segments = dicom_readback.seg_labels(tmp_path / "out" / entry["seg_path"], affine, shape)
    assert segments == {1: "External", 2: "Bone", 3: "Bladder", 4: "Rectum", 5: "Prostate"}
    np.testing.assert_array_equal(seg, labels)
    masks = dicom_readback.rtstruct_masks(tmp_path / "out" / entry["rtstruct_path"], affine, shape)
    assert list(masks) == ["External", "Bone", "Bladder", "Rectum", "Prostate"]
    np.testing.assert_array_equal(masks["External"], outline(labels))
    for number, name in enumerate(CLASS_NAMES[2:], start=2):
        np.testing.assert_array_equal(masks[dicom_io.roi_name(name)], labels == number, err_msg=name)


# ----------------------------------------------------------------------------- validity

@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian's dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors_in_the_outputs_and_the_phantom_series(phantom_case, tmp_path):
    outputs = [
        dicom_io.write_rtstruct(phantom_case.labels, phantom_case.series, CLASS_NAMES, tmp_path / "rtstruct.dcm"),
        dicom_io.write_seg(phantom_case.labels, phantom_case.series, CLASS_NAMES, tmp_path / "seg.dcm"),
        phantom_case.folder / "MR0001.dcm",
    ]
    for path in outputs:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        report = result.stdout + result.stderr
        print(f"dciodvfy {path.name}:\n{report}")
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_phantom_dicom_is_reproducible_and_leaves_the_nifti_bytes_alone(tmp_path):
    def run(folder, *extra):
        phantom_cli.main(phantom_cli.get_args(["--out", str(tmp_path / folder), "--patients", "1", "--weeks", "1",
                                       "--shape", "20", "16", "8", *extra]))
        return {p.relative_to(tmp_path / folder): p.read_bytes() for p in sorted((tmp_path / folder).rglob("*.*"))}

    first, again, without = run("a", "--dicom"), run("b", "--dicom"), run("c")
    assert first == again
    assert sum(p.suffix == ".dcm" for p in first) == 8
    assert {p: data for p, data in first.items() if p.suffix == ".gz"} == without


# ----------------------------------------------------------------------------- bad series

def drop_middle_slice(files):
    files[len(files) // 2].unlink()


def shift_one_slice(files):
    dataset = pydicom.dcmread(files[2])
    position = [float(v) for v in dataset.ImagePositionPatient]
    dataset.ImagePositionPatient = [position[0], position[1], position[2] + 0.8]  # spacing is 2.0 mm
    dataset.save_as(files[2], enforce_file_format=True)


def turn_one_slice(files):
    dataset = pydicom.dcmread(files[3])
    dataset.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal among axial slices
    dataset.save_as(files[3], enforce_file_format=True)


def copy_one_slice(files):
    dataset = pydicom.dcmread(files[1])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.save_as(files[1].with_name("copy.dcm"), enforce_file_format=True)


def leave_an_rtstruct_alone(files):
    folder = files[0].parent
    labels = np.zeros((10, 8, 6), dtype=np.uint8)
    labels[3:6, 2:5, 2:4] = 1
    rtstruct = dicom_io.write_rtstruct(labels, dicom_io.find_series(folder)[0], ["background", "organ"],
                                       folder.parent / "rtstruct.dcm")
    for path in files:
        path.unlink()
    shutil.move(rtstruct, folder / "rtstruct.dcm")


def compress_one_slice(files, transfer_syntax=JPEGLosslessSV1):
    """Compressed pixel data that is not really compressed data: the decoder (libjpeg) fails."""
    dataset = pydicom.dcmread(files[2])
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.PixelData = encapsulate([b"\xff\xd8 not really a JPEG stream \xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(files[2], enforce_file_format=True)


def corrupt_jpeg2000_slice(files):
    """JPEG 2000: both openjpeg and Pillow fail, and the line holds both reasons."""
    compress_one_slice(files, JPEG2000Lossless)


@pytest.mark.parametrize("damage, message", [
    (drop_middle_slice, r"1 missing slice"),
    (shift_one_slice, r"unevenly spaced slices"),
    (turn_one_slice, r"mixed orientations"),
    (copy_one_slice, r"two slices at the same position"),
    (leave_an_rtstruct_alone, r"no usable image series \(series 901 .*RT Structure Set Storage, not a volume image\)"),
    (compress_one_slice, r"MR0003.dcm: .*JPEG Lossless.*cannot be decoded"),
    (corrupt_jpeg2000_slice, r"MR0003.dcm: .*JPEG 2000.*cannot be decoded"),
])
def test_bad_series_get_one_line_errors_naming_the_folder(tmp_path, damage, message):
    folder = tmp_path / "series"
    damage(small_series(folder))
    with pytest.raises(DataError) as error:
        for series in dicom_io.find_series(folder):
            dicom_io.load_series(series)
    text = str(error.value)
    assert str(folder) in text and "\n" not in text
    assert re.search(message, text), text


def test_labels_on_another_grid_are_refused(phantom_case, tmp_path):
    with pytest.raises(ValueError, match="do not match the series grid"):
        dicom_io.write_rtstruct(phantom_case.labels[:, :, 1:], phantom_case.series, CLASS_NAMES, tmp_path / "r.dcm")
