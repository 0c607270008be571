"""Synthetic pelvic T2 MRI phantom laid out like the HipMRI 3D release.

The real data cannot be shipped, so this script writes look-alike cases: LPS volumes of
256 x 256 x 128 voxels (about 1.68 x 1.68 x 1.56 mm) with six label classes whose voxel shares
match HipMRI's within a factor of two. Anatomy is placed in millimetres around the centre of
the field of view, so any array shape shows the same body at a coarser or finer spacing.

Each patient has its own anatomy (habitus, bone size, organ size and position); weeks of one
patient share it and differ only in bladder and rectum filling, small organ shifts, patient
set-up and scanner effects, as in repeated radiotherapy scans.

    python phantom.py --out data/phantom --patients 10 --weeks 3
    python phantom.py --preview docs/phantom.png
    python phantom.py --dicom --out data/phantom_dicom --patients 1 --weeks 1
"""
import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from pelvicseg.phantom import BASE_SHAPE, BLADDER_FILLING, RECTUM_FILLING, make_case, save_preview, write_dicom_series, write_phantom
from pelvicseg.progress import progress


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, written as it would be typed (``256 256 128``, not a
    Python list); flags off or unset by default say nothing. The description's examples keep
    their lines."""

    def _get_help_string(self, action):
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{action.help} (default: {shown.replace('%', '%%')})"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder; gets semantic_MRs_anon/ and semantic_labels_anon/")
    parser.add_argument("--patients", type=int, default=10,
                        help="number of patients (ids start at --first-patient-id)")
    parser.add_argument("--weeks", type=int, default=3, help="scans per patient, written as Week0 .. Week{W-1}")
    parser.add_argument("--shape", type=int, nargs=3, default=list(BASE_SHAPE), metavar=("X", "Y", "Z"),
                        help="array shape; the field of view stays the same, so spacing scales with it")
    parser.add_argument("--fov", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("FX", "FY", "FZ"),
                        help="keep this central fraction of the field of view on each axis (another protocol's "
                        "smaller field of view; the anatomy stays where it is in mm)")
    parser.add_argument("--filling-range", type=float, nargs=2, default=list(BLADDER_FILLING), metavar=("LOW", "HIGH"),
                        help="each week's bladder volume over the patient's usual one, drawn uniformly in this range "
                        "(wider: larger week-to-week changes; the anatomy and other draws stay the same)")
    parser.add_argument("--rectum-filling-range", type=float, nargs=2, default=list(RECTUM_FILLING),
                        metavar=("LOW", "HIGH"), help="the same for the rectum's filling")
    parser.add_argument("--seed", type=int, default=0, help="seed; equal seeds give byte-identical files")
    parser.add_argument("--first-patient-id", type=int, default=4, metavar="ID",
                        help="id of the first patient (HipMRI starts at Case_004)")
    parser.add_argument("--preview", type=Path, default=None, metavar="PNG",
                        help="save three labelled slices of the first patient's Week0 (at --shape) to this PNG")
    parser.add_argument("--dicom", action="store_true",
                        help="also write each case as a DICOM MR series in --out/dicom/<case id>/, its voxels at "
                        "the same patient positions as in the NIfTI (for trying the DICOM input of predict.py)")
    args = parser.parse_args(argv)
    if args.dicom and args.out is None:
        parser.error("--dicom writes the cases as NIfTI and as DICOM series under --out; for example: "
                     "python phantom.py --dicom --out data/phantom_dicom --patients 1 --weeks 1")
    for flag, (low, high) in (("--filling-range", args.filling_range),
                              ("--rectum-filling-range", args.rectum_filling_range)):
        if not 0 < low <= high:
            parser.error(f"{flag} {low:g} {high:g}: needs 0 < LOW <= HIGH")
    if args.out is None and args.preview is None:
        parser.error("nothing to write: give --out DIR, --preview PNG or both; for example: "
                     "python phantom.py --out data/phantom")
    return args


def main(args):
    start = time.perf_counter()
    shape = tuple(args.shape)
    written = []
    if args.out is not None:
        pairs = write_phantom(args.out, args.patients, args.weeks, shape, args.seed, args.first_patient_id,
                              tuple(args.fov), tuple(args.filling_range), tuple(args.rectum_filling_range))
        written.append(f"{len(pairs)} image/label pairs of shape {shape} to {args.out}")
        if args.dicom:  # from the written NIfTI, so the series has exactly its geometry
            for image_path, _ in progress(pairs, "phantom DICOM"):
                nifti = nib.load(image_path)
                case_id = image_path.name.replace("_LFOV.nii.gz", "")
                write_dicom_series(nifti.get_fdata(dtype=np.float32), nifti.affine, args.out / "dicom" / case_id,
                                   case_id.split("_Week")[0], "T2 phantom", uid_entropy=(args.seed, case_id))
            written.append(f"{len(pairs)} DICOM series to {args.out / 'dicom'}")
    if args.preview is not None:
        image, label, affine = make_case(args.first_patient_id, 0, shape, args.seed)
        save_preview(image, label, args.preview, spacing=np.abs(np.diag(affine)[:3]))
        written.append(f"a preview to {args.preview}")
    print(f"wrote {' and '.join(written)} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(get_args())
