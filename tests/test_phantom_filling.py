"""phantom.py --filling-range / --rectum-filling-range: wider week-to-week filling, same anatomy."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phantom as phantom_command  # noqa: E402
from pelvicseg import phantom  # noqa: E402

SHAPE = ["48", "48", "24"]


def organ_voxels(folder: Path, organ: str) -> int:
    label = nib.load(folder / "semantic_labels_anon" / "Case_004_Week0_SEMANTIC_LFOV.nii.gz")
    return int((np.asarray(label.dataobj) == phantom.CLASS_NAMES.index(organ)).sum())


def test_filling_ranges_set_the_weekly_filling_and_defaults_keep_the_files(tmp_path):
    for name, ranges in (("empty", ["0.3", "0.3", "--rectum-filling-range", "0.6", "0.6"]),
                         ("full", ["2", "2", "--rectum-filling-range", "1.8", "1.8"]),
                         ("default", ["0.8", "1.25", "--rectum-filling-range", "0.8", "1.3"])):
        phantom_command.main(phantom_command.get_args(["--out", str(tmp_path / name), "--patients", "1", "--weeks",
                                                       "1", "--shape", *SHAPE, "--filling-range", *ranges]))
    # the bladder's volume scales with the filling (0.3 against 2: several times larger), the rectum grows too
    assert organ_voxels(tmp_path / "full", "bladder") > 4 * organ_voxels(tmp_path / "empty", "bladder")
    assert organ_voxels(tmp_path / "full", "rectum") > organ_voxels(tmp_path / "empty", "rectum")
    # the same bones (a full bladder covers a few voxels of them): only the fillings differ
    bone_full, bone_empty = organ_voxels(tmp_path / "full", "bone"), organ_voxels(tmp_path / "empty", "bone")
    assert abs(bone_full - bone_empty) <= 0.01 * bone_empty
    # the default ranges given explicitly write what the generator writes without them
    phantom.write_phantom(tmp_path / "plain", patients=1, weeks=1, shape=tuple(int(s) for s in SHAPE))
    for sub in ("semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz",
                "semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz"):
        assert (tmp_path / "plain" / sub).read_bytes() == (tmp_path / "default" / sub).read_bytes()
