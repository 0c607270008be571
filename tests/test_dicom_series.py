"""The series policy of dicom_series.py and the decoders of dicom_pixels.py on small series.

Series are 10 x 8 x 6 (phantom.write_dicom_series); their variants (multi-frame, compressed,
localizer, CT, echoes) come from tests/dicom_study.py, made with highdicom's legacy converter,
pydicom's encoders and tests/jpeg_lossless.py, not with the project's reader. Compressed files
from pydicom's own test data (written by other toolkits) are decoded against their uncompressed
original.
"""

import logging
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from pelvicseg.dicom import outputs as dicom_io
from pelvicseg.dicom import pixels as dicom_pixels
from pelvicseg.dicom import series as dicom_series
import dicom_study
from pelvicseg import phantom
from dataset import DataError

SHAPE = (10, 8, 6)


def oblique_affine(spacing=(1.5, 1.2, 2.0), origin=(-7.0, -4.0, 10.0)):
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    directions = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])  # turned about the scanner's z
    lps = np.eye(4)
    lps[:3, :3] = directions * np.asarray(spacing)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_series(folder, seed=1, affine=None, description="small", number=1, shape=SHAPE, **kwargs):
    image = np.random.default_rng(seed).integers(0, 4000, size=shape).astype(np.float32)
    files = phantom.write_dicom_series(image, oblique_affine() if affine is None else affine, folder,
                                       "Synthetic_001", description, series_number=number, **kwargs)
    return image, files


def one(scan):
    assert len(scan.usable) == 1, [s.line() for s in scan.skipped]
    return scan.usable[0]


# ----------------------------------------------------------------------------- multi-frame

def test_enhanced_copy_is_read_through_its_functional_groups_onto_the_single_frame_grid(tmp_path):
    image, files = write_series(tmp_path / "single")
    dicom_study.enhanced(files, tmp_path / "enhanced")
    single = one(dicom_series.scan_series(tmp_path / "single"))
    enhanced = one(dicom_series.scan_series(tmp_path / "enhanced"))
    assert enhanced.is_multiframe and not single.is_multiframe
    assert enhanced.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.4"  # Legacy Converted Enhanced MR
    # highdicom stores the frames in its own order; the reader sorts them along the normal
    assert list(enhanced.frame_numbers) != sorted(enhanced.frame_numbers)
    assert enhanced.shape == single.shape == SHAPE
    np.testing.assert_allclose(enhanced.affine, single.affine, atol=1e-9)
    np.testing.assert_array_equal(dicom_pixels.load_series(enhanced)[0], dicom_pixels.load_series(single)[0])
    np.testing.assert_array_equal(dicom_pixels.load_series(single)[0], image)


def test_rtstruct_and_seg_of_an_enhanced_series_refer_to_its_frames(tmp_path):
    _, files = write_series(tmp_path / "single")
    dicom_study.enhanced(files, tmp_path / "enhanced")
    series = one(dicom_series.scan_series(tmp_path / "enhanced"))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:8, 1:7, 1:5] = 1
    labels[4:6, 3:5, 2:4] = 3  # a hole in the body ROI's label, filled in its outline
    names = ["background", "body", "bone", "bladder"]
    rtstruct = dicom_io.write_rtstruct(labels, series, names, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(rtstruct)
    references = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert {(r.ReferencedSOPInstanceUID, int(r.ReferencedFrameNumber)) for r in references} == {
        (series.sop_instance_uids[0], n) for n in range(1, 7)}
    masks = dicom_io.read_rtstruct_masks(rtstruct, series)
    assert set(masks) == {"External", "Bladder"}  # TG-263 names; bone has no voxel
    np.testing.assert_array_equal(masks["Bladder"], labels == 3)
    np.testing.assert_array_equal(masks["External"], labels > 0)

    seg = hd.seg.segread(dicom_io.write_seg(labels, series, names, tmp_path / "seg.dcm"))
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    frames = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(series.frame_numbers), combine_segments=True,
                                            assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), labels)


# ----------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("encode", [
    lambda files, folder: dicom_study.jpeg_lossless_copy(files, folder),
    lambda files, folder: dicom_study.compressed_copy(files, folder, RLELossless),
    lambda files, folder: dicom_study.compressed_copy(files, folder, JPEG2000Lossless),
], ids=["jpeg-lossless-sv1", "rle", "jpeg2000-lossless"])
def test_compressed_copies_decode_to_the_uncompressed_volume(tmp_path, encode):
    image, files = write_series(tmp_path / "plain", shape=(40, 36, 3))  # openjpeg's 6 resolutions need 32 pixels
    written = encode(files, tmp_path / "compressed")
    assert pydicom.dcmread(written[0]).file_meta.TransferSyntaxUID.is_compressed
    volume, affine = dicom_pixels.load_series(one(dicom_series.scan_series(tmp_path / "compressed")))
    np.testing.assert_array_equal(volume, image)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_files_encoded_by_other_toolkits_decode_to_their_original(name):
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    pixels, _ = dicom_pixels.read_pixels(Path(get_testdata_file(name)))
    np.testing.assert_array_equal(pixels, reference)


def test_jpeg_extended_12_bit_decodes_as_dcmtk_decodes_it():
    """pydicom's JPGExtended.dcm (12-bit lossy): dcmtk 3.6.7's dcmdjpeg decodes it to a mean of
    14.36999 over 1024 x 256 pixels; libjpeg's inverse DCT differs from dcmtk's by at most 1 at a
    pixel, which moves the mean by about 0.013."""
    pixels, syntax = dicom_pixels.read_pixels(Path(get_testdata_file("JPGExtended.dcm")))
    assert "JPEG Extended" in syntax and pixels.shape == (1024, 256)
    assert abs(float(pixels.mean()) - 14.36999) < 0.02
    assert int(pixels.max()) < 4096


def test_undecodable_slice_is_one_line_naming_the_file_without_library_tracebacks(tmp_path, caplog):
    _, files = write_series(tmp_path / "series")
    dataset = pydicom.dcmread(files[2])
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    dataset.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(files[2], enforce_file_format=True)
    series = one(dicom_series.scan_series(tmp_path / "series"))  # the header looks fine
    logging.getLogger("hipmri").setLevel(logging.INFO)  # as cli.py sets it without --debug
    caplog.set_level(logging.WARNING)
    with pytest.raises(DataError) as error:
        dicom_pixels.load_series(series)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{files[2]}: pixel data (JPEG Lossless")
    assert "libjpeg" in text and "Traceback" not in text
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    # with --debug the decoders' own tracebacks are there to read
    logging.getLogger("hipmri").setLevel(logging.DEBUG)
    try:
        with pytest.raises(DataError):
            dicom_pixels.load_series(series)
    finally:
        logging.getLogger("hipmri").setLevel(logging.NOTSET)
    assert any(r.name.startswith("pydicom") and r.exc_info for r in caplog.records)


# ----------------------------------------------------------------------------- the policy

def with_private_b_value(files, b_values):
    """Siemens' private DiffusionBValue (0019,100C), as an IS string under its private creator."""
    for path, b in zip(files, b_values):
        dataset = pydicom.dcmread(path)
        dataset.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
        dataset.add_new((0x0019, 0x100C), "IS", str(b))
        dataset.save_as(path, enforce_file_format=True)


def test_a_study_folder_gives_its_usable_series_and_each_skipped_one_with_its_reason(tmp_path):
    study = tmp_path / "study"
    _, t2 = write_series(study / "T2", description="T2 axial", number=3)
    dicom_study.copy(t2, study / "T2_again")
    dicom_study.localizer(t2, study / "localizer")
    dicom_study.ct(t2, study / "CT")
    dicom_study.dual_echo(t2, study / "dual_echo")
    _, diffusion = write_series(study / "dwi", description="DWI", number=7)
    more = [dicom_study._save(dicom_study._renewed(p, pydicom.dcmread(p).SeriesInstanceUID), study / "dwi", f"b800_{i}")
            for i, p in enumerate(diffusion)]
    with_private_b_value(diffusion, [0] * 6)
    with_private_b_value(more, [800] * 6)
    _, single = write_series(study / "single", description="one slice", number=8)
    for path in single[1:]:
        path.unlink()
    _, gap = write_series(study / "gap", description="gap", number=9)
    gap[3].unlink()
    _, numbered = write_series(study / "acquisitions", description="one acquisition per slice", number=10)
    for k, path in enumerate(numbered):  # some scanners number each slice's acquisition: no reason to split
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = k + 1
        dataset.save_as(path, enforce_file_format=True)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:6, 2:5, 2:4] = 1
    dicom_io.write_rtstruct(labels, one(dicom_series.scan_series(study / "T2")), ["background", "organ"],
                            study / "T2_rtstruct" / "rt.dcm")

    scan = dicom_series.scan_series(study)
    assert sorted(s.case_id for s in scan.usable) == ["T2", "acquisitions", "dual_echo_echo1", "dual_echo_echo2",
                                                      "dwi_b0", "dwi_b800"]
    echo2 = next(s for s in scan.usable if s.case_id == "dual_echo_echo2")
    assert echo2.part == "echo 2 (TE 90 ms)" and echo2.describe().endswith(", echo 2 (TE 90 ms)")
    t2 = next(s for s in scan.usable if s.case_id == "T2")
    assert {Path(f).parent.name for f in t2.files} == {"T2"}  # the copy's files were passed over
    np.testing.assert_array_equal(dicom_pixels.load_series(echo2)[0],
                                  np.rint(dicom_pixels.load_series(t2)[0] * 0.5))
    reasons = {s.folder.name: s.reason for s in scan.skipped}
    assert set(reasons) == {"T2_again", "localizer", "CT", "single", "gap", "T2_rtstruct"}
    assert re.search(r"6 file\(s\) repeat instances already read", reasons["T2_again"])
    assert re.search(r"mixed orientations: 3 different .*LOCALIZER.*localizer", reasons["localizer"])
    assert reasons["CT"].startswith("modality CT: the model reads MR (--allow-modality CT")
    assert reasons["single"] == "a single slice, not a volume"
    assert reasons["gap"].startswith("1 missing slice(s)")
    assert reasons["T2_rtstruct"] == "RT Structure Set Storage, not a volume image"
    assert all("\n" not in s.line() and s.line().startswith(f"skipped {s.folder}: series ") for s in scan.skipped)

    allowed = dicom_series.scan_series(study, modalities=("MR", "CT"))
    assert "CT" in [s.case_id for s in allowed.usable]


def test_an_irregular_series_with_nothing_to_split_along_keeps_its_own_reason(tmp_path):
    _, files = write_series(tmp_path / "series")
    dataset = pydicom.dcmread(files[1])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.EchoNumbers = 2  # one slice of "echo 2" alone is no echo of its own
    dataset.save_as(files[1].with_name("copy.dcm"), enforce_file_format=True)
    scan = dicom_series.scan_series(tmp_path / "series")
    assert not scan.usable
    (skipped,) = scan.skipped
    assert skipped.reason.startswith("two slices at the same position")
    with pytest.raises(DataError, match=r"series: no usable image series \(series 1 \(small, .*two slices"):
        dicom_series.find_series(tmp_path / "series")


def test_series_are_chosen_by_uid_number_or_description_pattern(tmp_path):
    write_series(tmp_path / "study" / "a", description="T2 TSE axial", number=3)
    write_series(tmp_path / "study" / "b", seed=2, description="T1 VIBE", number=5)
    scan = dicom_series.scan_series(tmp_path / "study")
    uid_b = next(s.series_uid for s in scan.usable if s.case_id == "b")
    for patterns, kept in ((["3"], ["a"]), ([uid_b], ["b"]), (["*t2*"], ["a"]), (["5", "T2 TSE*"], ["a", "b"])):
        chosen = dicom_series.select_series(scan, patterns)
        assert sorted(s.case_id for s in chosen.usable) == kept
        assert all("not selected by --series" in s.reason for s in chosen.skipped)
    with pytest.raises(DataError, match=r"--series 4 matches no usable series \(usable: .*series 3 \(T2 TSE axial"):
        dicom_series.select_series(scan, ["4"])


def test_output_requirements_name_the_series_that_lacks_a_uid(tmp_path):
    _, files = write_series(tmp_path / "series", description="T2 anonymised")
    for path in files:
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path, enforce_file_format=True)
    series = dicom_series.find_series(tmp_path / "series")
    dicom_series.check_output_requirements(series, ["nifti"])
    with pytest.raises(DataError) as error:
        dicom_series.check_output_requirements(series, ["seg", "rtstruct"])
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'series'))}: series 1 \(T2 anonymised, [0-9.]+\): "
                        r"--output-format seg needs FrameOfReferenceUID, .*nothing was written", str(error.value))


def test_two_series_of_one_name_get_a_suffix_and_the_others_keep_their_folder_names(tmp_path):
    write_series(tmp_path / "study" / "p1" / "T2", number=3)
    write_series(tmp_path / "study" / "p2" / "T2", seed=2, number=3)
    write_series(tmp_path / "study" / "p2" / "T1", seed=3, number=4)
    assert sorted(s.case_id for s in dicom_series.find_series(tmp_path / "study")) == ["T1", "T2", "T2_2"]


def test_roi_names_default_to_tg263_and_a_flag_replaces_them():
    classes = ["background", "body", "bone", "bladder", "rectum", "prostate"]
    assert [dicom_io.roi_name(c) for c in classes[1:]] == ["External", "Bone", "Bladder", "Rectum", "Prostate"]
    names = dicom_io.parse_roi_names(["bone=Bone_Pelvic", "body=Body"], classes)
    assert [dicom_io.roi_name(c, names) for c in classes[1:]] == ["Body", "Bone_Pelvic", "Bladder", "Rectum",
                                                                  "Prostate"]
    for bad, message in ((["bone"], "expected CLASS=NAME"), (["femur=Femur_L"], "no class 'femur'"),
                         (["rectum=Bladder"], "share the ROI name Bladder")):
        with pytest.raises(DataError, match=message):
            dicom_io.parse_roi_names(bad, classes)
