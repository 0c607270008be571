"""predict.py on a study folder as a scanner or PACS writes it, and on an ensemble's splits.

The study holds a T2 (phantom.py's DICOM writer, from a test case of the tiny run below), its
Legacy Converted Enhanced MR copy (highdicom), its JPEG Lossless re-encoding
(tests/jpeg_lossless.py), a copy of it with one undecodable slice, a three-plane localizer, a CT,
a second export of the T2 (the same instances) and a dual-echo series. A tiny network is trained
for one epoch (as tests/test_predict.py's ``trained``); its labels need not be good, only the same
for the same voxels.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.encaps import encapsulate

from pelvicseg.dicom import outputs as dicom_io
from pelvicseg.dicom import series as dicom_series
import dicom_readback
import dicom_study
from pelvicseg import phantom
import predict
import train
from pelvicseg.cli import run_cli
from dataset import CLASS_NAMES, find_cases

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
PREDICTED = ["T2", "T2_enhanced", "T2_jpeg_lossless", "dual_echo_echo1", "dual_echo_echo2"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def predict_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    data = base / "data"
    phantom.write_phantom(data, patients=5, weeks=2, shape=(20, 18, 12), seed=0)
    # train.py's entry point in this process: only its checkpoint is used here
    assert run_cli(train.main, train.get_args(["--data-root", str(data), "--out", str(base / "run"), "--epochs", "1",
                                               "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8",
                                               "--workers", "0", "--device", "cpu"])) == 0
    return {"base": base, "data": data, "checkpoint": base / "run" / "best.pt"}


@pytest.fixture(scope="module")
def study(trained):
    folder = trained["base"] / "exports" / "study"
    case = find_cases(trained["data"])[0]
    source = nib.load(case.image)
    t2 = phantom.write_dicom_series(source.get_fdata(dtype=np.float32), source.affine, folder / "T2", "Case_004",
                                    "T2 axial", series_number=3)
    dicom_study.enhanced(t2, folder / "T2_enhanced")
    dicom_study.jpeg_lossless_copy(t2, folder / "T2_jpeg_lossless")
    broken = dicom_study.jpeg_lossless_copy(t2, folder / "T2_broken", series_number=16)
    dataset = pydicom.dcmread(broken[3])
    dataset.PixelData = encapsulate([b"\xff\xd8 cut short \xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(broken[3], enforce_file_format=True)
    dicom_study.localizer(t2, folder / "localizer")
    dicom_study.ct(t2, folder / "CT")
    dicom_study.copy(t2, folder / "T2_second_export")
    dicom_study.dual_echo(t2, folder / "dual_echo")
    return {"folder": folder, "source": source, "broken": broken[3]}


@pytest.fixture(scope="module")
def predicted(trained, study):
    out = trained["base"] / "predictions"
    result = run(["predict.py", "--checkpoint", str(trained["checkpoint"]), "--input", str(study["folder"]),
                  "--out", str(out), "--device", "cpu", "--no-figures", "--no-hd95",
                  "--output-format", "nifti", "rtstruct", "seg"])
    assert result.returncode == 0, explain(result)
    return {"out": out, "result": result}


def test_study_folder_predicts_each_usable_series_and_skips_the_rest_with_reasons(study, predicted):
    out, result = predicted["out"], predicted["result"]
    assert sorted(p.name[:-len("_pred.nii.gz")] for p in out.glob("*_pred.nii.gz")) == PREDICTED
    labels = {name: nib.load(out / f"{name}_pred.nii.gz") for name in PREDICTED}
    reference = np.asanyarray(labels["T2"].dataobj)
    for name in ("T2_enhanced", "T2_jpeg_lossless"):  # the same voxels, three ways stored
        np.testing.assert_array_equal(np.asanyarray(labels[name].dataobj), reference, err_msg=name)
        np.testing.assert_allclose(labels[name].affine, study["source"].affine, atol=1e-4)
    for name in ("metrics.csv", "summary.json", "report.html"):
        assert (out / name).is_file(), name

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_predicted"] == len(PREDICTED)
    skipped = {Path(s["folder"]).name: s["reason"] for s in summary["skipped_series"]}
    assert set(skipped) == {"localizer", "CT", "T2_second_export", "T2_broken"}
    assert "mixed orientations" in skipped["localizer"] and "localizer" in skipped["localizer"]
    assert skipped["CT"].startswith("modality CT: the model reads MR")
    assert "repeat instances already read" in skipped["T2_second_export"]
    assert skipped["T2_broken"].startswith(f"{study['broken']}: pixel data (JPEG Lossless")
    for item in summary["skipped_series"]:  # one line each on stdout
        assert sum(line.startswith(f"skipped {item['folder']}: ") for line in result.stdout.splitlines()) == 1
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Skipped series (4)" in report and report.count("data-skipped=") == 4
    assert "Traceback" not in result.stderr and "libjpeg error" not in result.stderr


def test_rtstruct_and_seg_of_the_study_read_back_as_the_nifti_labels(study, predicted):
    out = predicted["out"]
    scan = dicom_series.scan_series(study["folder"])
    series = {s.case_id: s for s in scan.usable}
    from highdicom.seg import segread
    for name in ("T2", "T2_enhanced"):
        labels = np.asanyarray(nib.load(out / f"{name}_pred.nii.gz").dataobj)
        masks = dicom_io.read_rtstruct_masks(out / f"{name}_rtstruct.dcm", series[name])  # even-odd
        present = [c for c in range(2, len(CLASS_NAMES)) if (labels == c).any()]
        assert set(masks) == {"External", *(dicom_io.roi_name(CLASS_NAMES[c]) for c in present)}, name
        for c in present:
            np.testing.assert_array_equal(masks[dicom_io.roi_name(CLASS_NAMES[c])], labels == c, err_msg=name)
    union = dicom_study.union_reader_masks(out / "T2_rtstruct.dcm", series["T2"])  # every contour filled
    labels = np.asanyarray(nib.load(out / "T2_pred.nii.gz").dataobj)
    for c in range(2, len(CLASS_NAMES)):
        if (labels == c).any():
            np.testing.assert_array_equal(union[dicom_io.roi_name(CLASS_NAMES[c])], labels == c)
    for name in ("T2", "T2_enhanced"):  # single-frame and multi-frame source, each SEG read back by its pixels
        seg = segread(out / f"{name}_seg.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[name].series_uid
        prediction = nib.load(out / f"{name}_pred.nii.gz")
        labels = np.asanyarray(prediction.dataobj)
        # frames placed by their own plane positions through the NIfTI affine, contours by their points
        from_seg, segments = dicom_readback.seg_labels(out / f"{name}_seg.dcm", prediction.affine, labels.shape)
        assert segments == {c: dicom_io.roi_name(n) for c, n in enumerate(CLASS_NAMES) if c > 0}, name
        np.testing.assert_array_equal(from_seg, labels, err_msg=name)
        masks = dicom_readback.rtstruct_masks(out / f"{name}_rtstruct.dcm", prediction.affine, labels.shape)
        for c in range(2, len(CLASS_NAMES)):
            if (labels == c).any():
                np.testing.assert_array_equal(masks[dicom_io.roi_name(CLASS_NAMES[c])], labels == c, err_msg=name)
    summary = json.loads((out / "summary.json").read_text())
    labels = np.asanyarray(nib.load(out / "T2_pred.nii.gz").dataobj)
    absent = {CLASS_NAMES[c] for c in range(2, len(CLASS_NAMES)) if not (labels == c).any()}
    if not labels.any():  # the body's EXTERNAL outlines every labelled voxel, not only the body label
        absent.add("body")
    assert set(summary["left_out_of_rtstruct"].get("T2", [])) == absent


def test_roi_names_on_the_command_line_name_the_rtstruct_rois_and_seg_segments(trained, study, tmp_path, capsys):
    out = tmp_path / "named"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["checkpoint"]), "--input",
                                               str(study["folder"]), "--out", str(out), "--device", "cpu",
                                               "--no-figures", "--no-hd95", "--series", "3", "--output-format",
                                               "rtstruct", "seg", "--roi-names", "bone=Bone_Pelvic", "body=BODY"],
                                              capsys)
    assert code == 0, stdout + stderr
    prediction = nib.load(out / "T2_pred.nii.gz")
    labels = np.asanyarray(prediction.dataobj)
    names = {"body": "BODY", "bone": "Bone_Pelvic", "bladder": "Bladder", "rectum": "Rectum", "prostate": "Prostate"}
    _, segments = dicom_readback.seg_labels(out / "T2_seg.dcm", prediction.affine, labels.shape)
    assert segments == {c: names[n] for c, n in enumerate(CLASS_NAMES) if c > 0}
    masks = dicom_readback.rtstruct_masks(out / "T2_rtstruct.dcm", prediction.affine, labels.shape)
    assert set(masks) == {"BODY", *(names[CLASS_NAMES[c]] for c in range(2, len(CLASS_NAMES)) if (labels == c).any())}

    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["checkpoint"]), "--input",
                                               str(study["folder"]), "--out", str(tmp_path / "refused"), "--device",
                                               "cpu", "--series", "3", "--output-format", "rtstruct",
                                               "--roi-names", "bone=Prostate"], capsys)
    assert code == 2 and "--roi-names: two classes would share the ROI name Prostate" in stderr, stderr
    assert not (tmp_path / "refused").exists()


def test_library_info_lines_stay_off_stderr(study, predicted, tmp_path, caplog):
    """highdicom logs INFO lines while it writes a SEG (shown here in-process at INFO); cli.py
    keeps libraries at WARNING, so the run's stderr has none of them."""
    caplog.set_level(logging.INFO)
    series = dicom_series.find_series(study["folder"] / "T2")[0]
    dicom_io.write_seg(np.ones(series.shape, dtype=np.uint8), series, CLASS_NAMES[:2], tmp_path / "seg.dcm")
    assert any(r.name.startswith("highdicom") and r.levelno == logging.INFO for r in caplog.records)
    stderr = predicted["result"].stderr
    assert "highdicom" not in stderr and "INFO" not in stderr, stderr[-2000:]


def test_allow_modality_predicts_the_ct_chosen_by_series_and_warns(trained, study, tmp_path, capsys):
    out = tmp_path / "ct"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["checkpoint"]), "--input",
                                               str(study["folder"]), "--out", str(out), "--device", "cpu",
                                               "--no-figures", "--no-hd95", "--series", "14", "--allow-modality", "CT"],
                                              capsys)
    assert code == 0, stdout + stderr
    assert [p.name for p in out.glob("*_pred.nii.gz")] == ["CT_pred.nii.gz"]
    summary = json.loads((out / "summary.json").read_text())
    (warning,) = summary["warnings"]
    assert "modality CT" in warning and "trained on MR only" in warning
    # the five predicted above, and T2_broken, whose slices are read only when it is chosen
    assert sum("not selected by --series 14" in s["reason"] for s in summary["skipped_series"]) == len(PREDICTED) + 1
    assert "<strong>Warning:</strong>" in (out / "report.html").read_text(encoding="utf-8")


def test_an_image_problem_in_a_dicom_series_names_the_series_not_its_nifti_copy(trained, tmp_path, capsys):
    files = phantom.write_dicom_series(np.full((20, 18, 12), 300.0, dtype=np.float32), np.diag([-2, -2, 3, 1.0]),
                                       tmp_path / "flat" / "T2", "Case_009", "flat T2", series_number=4)
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["checkpoint"]), "--input",
                                               str(tmp_path / "flat"), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]  # progress lines besides
    assert line.startswith(f"error: {files[0].parent}: series 4 (flat T2, ") and "image is constant" in line
    assert "dicom_as_nifti" not in line


def test_missing_frame_of_reference_stops_the_run_before_anything_is_written(trained, study, tmp_path, capsys):
    folder = tmp_path / "anonymised"
    for path in (study["folder"] / "T2").iterdir():
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        (folder / "T2").mkdir(parents=True, exist_ok=True)
        dataset.save_as(folder / "T2" / path.name, enforce_file_format=True)
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["checkpoint"]), "--input", str(folder),
                                               "--out", str(out), "--device", "cpu", "--output-format", "rtstruct"],
                                              capsys)
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert "series 3 (T2 axial" in line and "--output-format rtstruct needs FrameOfReferenceUID" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- ensembles

def member_with_split(trained, folder: Path, split: dict) -> Path:
    state = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    state["split"] = split
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "best.pt")
    return folder / "best.pt"


@pytest.mark.parametrize("split, other, message", [
    ("test", lambda s: {"train": s["train"], "val": s["test"], "test": s["val"]},
     r"^error: --split test: the models' test patients differ \(.*best\.pt: \d+; .*best\.pt: \d+\)"),
    ("val", lambda s: s, r"^error: --split val with 2 models: each model trained or validated on some of these"),
    ("train", lambda s: s, r"^error: --split train with 2 models"),
])
def test_an_ensemble_is_evaluated_only_on_patients_none_of_its_models_saw(trained, tmp_path, capsys, split, other,
                                                                          message):
    own = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)["split"]
    second = member_with_split(trained, tmp_path / "b", other(own))
    out = tmp_path / "out"
    code, stdout, stderr = predict_in_process(["--checkpoint", str(trained["checkpoint"]), str(second),
                                               "--data-root", str(trained["data"]), "--split", split, "--out", str(out),
                                               "--device", "cpu"], capsys)
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert __import__("re").search(message, line), line
    assert not out.exists()


def test_an_ensemble_that_shares_its_test_patients_takes_them(trained, tmp_path):
    own = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)["split"]
    folds = {"train": own["train"][1:] + own["val"], "val": own["train"][:1], "test": own["test"]}  # another fold
    members = predict.load_members([trained["checkpoint"], member_with_split(trained, tmp_path / "b", folds)])
    assert predict.evaluation_split(members, "test") == {"test": sorted(own["test"])}
    assert predict.evaluation_split(members[:1], "val") == own  # one model: its own split, as before
