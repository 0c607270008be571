"""predict.py --input with a folder of NIfTI files (dataset.cases_from_input): which files are
cases, their ids, and the collision check on the planned outputs. No model is needed."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest

import predict
from dataset import Case, DataError, cases_from_input, unique_case_ids


def touch_nifti(hipmri, path):
    image, _ = hipmri.synthetic_case(seed=len(str(path)))
    return hipmri.write_nifti(path, image)


def test_every_image_under_the_folder_is_a_case_with_an_id_of_its_own(hipmri, tmp_path, caplog):
    root = tmp_path / "scans"
    for name in ("pelvis.nii.gz", "pelvis_LFOV.nii.gz", "t2.nii", "t2.nii.gz", "unlabelled/scan.nii.gz",
                 "site_a/scan.nii.gz", "Case_004_Week0_LFOV.nii.gz",
                 # not images: a label by name, label folders, HipMRI's label of the case above
                 "scan_label.nii.gz", "labels/scan.nii.gz", "site_labels/x.nii.gz",
                 "semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz"):
        touch_nifti(hipmri, root / name)
    (root / "notes.nii.txt").write_text("not an image\n")
    caplog.set_level(logging.WARNING)
    cases = {c.case_id: c for c in cases_from_input(root)}
    assert sorted(cases) == ["Case_004_Week0", "pelvis", "pelvis_LFOV", "site_a__scan", "t2_nii", "t2_nii_gz",
                             "unlabelled__scan"]  # "label" inside a word is no label folder
    hipmri_case = cases["Case_004_Week0"]  # its HipMRI name attaches its label; the other images are cases too
    assert hipmri_case.label.endswith("Case_004_Week0_SEMANTIC_LFOV.nii.gz") and hipmri_case.patient == "004"
    assert all(c.label is None for name, c in cases.items() if name != "Case_004_Week0")
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{root / 'scan_label.nii.gz'}: skipped: its name marks a label (label)" in warnings
    assert f"{root / 'labels' / 'scan.nii.gz'}: skipped: in the label folder labels" in warnings
    assert f"{root / 'site_labels' / 'x.nii.gz'}: skipped: in the label folder site_labels" in warnings
    assert f"{root / 'notes.nii.txt'}: skipped: not a .nii or .nii.gz file" in warnings


def test_case_ids_stay_unique_ignoring_case_and_are_found_in_linear_time():
    paths = [Path("a/scan.nii.gz"), Path("a__scan.nii.gz"), Path("T2.nii"), Path("t2.nii"), Path("t2.nii.gz")]
    ids = unique_case_ids(paths)
    assert len({i.lower() for i in ids}) == len(ids), ids
    many = [Path(f"site_{k % 50}/scan_{k // 50}.nii.gz") for k in range(40000)] + [Path("scan_0.nii.gz")]
    start = time.perf_counter()
    ids = unique_case_ids(many)
    assert len({i.lower() for i in ids}) == len(many)
    assert time.perf_counter() - start < 5.0  # counting each name in the list (quadratic) takes far longer


def test_planned_outputs_that_would_collide_are_refused_before_anything_is_written(tmp_path):
    cases = [Case(str(tmp_path / "a" / "T2.nii.gz"), None, "T2", "", 0),
             Case(str(tmp_path / "b" / "t2.nii.gz"), None, "t2", "", 0)]
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b/t2\.nii\.gz: its outputs .*would overwrite those of .*a/T2\.nii\.gz"):
        predict.check_output_folder(out, [str(tmp_path / "a"), str(tmp_path / "b")], cases, overwrite=True)
    assert not out.exists()
    predict.check_output_folder(out, [str(tmp_path / "a")], cases[:1], overwrite=False)


def test_a_folder_without_images_names_the_folder(tmp_path):
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "x.npy", np.zeros(3))
    with pytest.raises(DataError, match=rf"{tmp_path}: no \.nii or \.nii\.gz images found"):
        cases_from_input(tmp_path)
