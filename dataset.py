"""HipMRI data: finding and validating image/label pairs, the patient-level split, and the MONAI
transforms shared by training and prediction.

Both layouts of the HipMRI release are accepted without flags:

    semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz   semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz
    semantic_MRs/K004_Week0_LFOV.nii.gz            semantic_labels_only/K004_Week0_SEMANTIC.nii.gz

Files are paired by the key (patient, week) parsed from their names, never by sorted position.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.dummy import DummyProcess
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, MetaTensor, NibabelReader, image_reader
from monai.utils import ensure_tuple

from pelvicseg.atomic import write_text
from pelvicseg.errors import DataError

log = logging.getLogger("hipmri")

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
ORIENTATION = "LPS"  # HipMRI's stored orientation: array order stays the order users see on disk
MAX_ABS_INTENSITY = 1e30  # far above any MRI scale, far below float32's 3.4e38
MAX_RESAMPLED_AXIS = 2048  # voxels per axis after resampling: 8x HipMRI's largest, far below memory limits

# Case_004_Week0_LFOV.nii.gz, K004_Week0_LFOV.nii.gz, ..._SEMANTIC_LFOV / ..._SEMANTIC for labels.
NAME_PATTERN = re.compile(
    r"^(?:Case_|K)(?P<patient>\d+)_Week(?P<week>\d+)(?P<semantic>_SEMANTIC)?(?:_LFOV)?\.nii(?:\.gz)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Case:
    image: str
    label: str | None
    case_id: str  # e.g. Case_004_Week0 (the image file name without suffixes)
    patient: str
    week: int

    def as_dict(self) -> dict:
        item = {"image": self.image, "case_id": self.case_id, "patient": self.patient}
        if self.label is not None:
            item["label"] = self.label
        return item


def case_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"_LFOV$", "", name, flags=re.IGNORECASE)


def find_cases(data_root: str | Path, require_labels: bool = True) -> list[Case]:
    """All (image, label) pairs under ``data_root``, paired by (patient, week).

    Unpaired files are reported with a warning; duplicates of one key and an empty result are
    errors. Sorted by (patient, week) so the result does not depend on the file system's order.
    """
    root = Path(data_root)
    if not root.exists():
        raise DataError(f"{root}: data root does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a folder")
    images: dict[tuple[str, int], Path] = {}
    labels: dict[tuple[str, int], Path] = {}
    for path in sorted(root.rglob("*.nii*")):
        match = NAME_PATTERN.match(path.name)
        if match is None or not path.is_file():
            continue
        key = (f"{int(match['patient']):03d}", int(match["week"]))
        target = labels if match["semantic"] else images
        if key in target:
            first = target[key]
            first_dataset, second_dataset = first.parent.parent, path.parent.parent  # above semantic_MRs*/
            if first_dataset != second_dataset:
                raise DataError(f"{root}: holds more than one HipMRI dataset ({first_dataset} and {second_dataset} "
                                f"both have patient {key[0]} week {key[1]}); point --data-root at one of them")
            raise DataError(f"{path}: a second file for patient {key[0]} week {key[1]} (first: {first})")
        target[key] = path
    if not images and not labels:
        raise DataError(
            f"{root}: no HipMRI NIfTI files found (expected e.g. semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz)"
        )
    for key in sorted(set(labels) - set(images)):
        log.warning("%s: label without image, skipped", labels[key])
    cases = []
    for key in sorted(images):
        label = labels.get(key)
        if label is None and require_labels:
            log.warning("%s: image without label, skipped", images[key])
            continue
        cases.append(Case(str(images[key]), str(label) if label else None,
                          case_id_from_path(images[key]), key[0], key[1]))
    if not cases:
        raise DataError(f"{root}: no image has a matching label (pairs are matched by patient and week)")
    return cases


# A label file outside HipMRI naming: one of these words as a whole part of the name, set off by
# "_", "-" or "." (so "scan_label", "a_seg", "label_a" and "Case_004_Week0_SEMANTIC" are labels,
# "unlabelled" is not); a folder is a label folder when one of its name's parts is "label(s)".
LABEL_NAME = re.compile(r"(?:^|[_\-.])(?:semantic|labels?|seg|mask)(?=[_\-.]|$)", re.IGNORECASE)
LABEL_FOLDER = re.compile(r"(?:^|[_\-.\s])labels?(?=[_\-.\s]|$)", re.IGNORECASE)
NIFTI_NAME = re.compile(r"\.nii(?:\.gz)?$", re.IGNORECASE)


def cases_from_input(path: str | Path) -> list[Case]:
    """Images to predict: one NIfTI file, or every NIfTI image under a folder.

    HipMRI names only attach labels: an image named like ``Case_004_Week0_LFOV.nii.gz`` is paired
    with its ``_SEMANTIC`` label and carries its patient and week, and every other image is a
    case all the same. Label files (``LABEL_NAME``) and files in label folders (``LABEL_FOLDER``)
    are not images; they and files that are not ``.nii``/``.nii.gz`` are named in a warning with
    the reason. Case ids are unique by construction, ignoring case (output names must differ on
    any file system): the file name without ``.nii(.gz)`` and ``_LFOV``, and where two files
    would share one, more of it in steps (the folders below ``path``, then ``_LFOV``, then the
    extension), and a number as the last resort.
    """
    path = Path(path)
    if path.is_file():
        match = NAME_PATTERN.match(path.name)
        patient, week = (f"{int(match['patient']):03d}", int(match["week"])) if match else ("", 0)
        return [Case(str(path), None, case_id_from_path(path), patient, week)]
    if not path.is_dir():
        raise DataError(f"{path}: input does not exist")
    images, labels = [], {}
    for file in sorted(p for p in path.rglob("*.nii*") if p.is_file()):
        relative = file.relative_to(path)
        if not NIFTI_NAME.search(file.name):
            log.warning("%s: skipped: not a .nii or .nii.gz file", file)
            continue
        match = NAME_PATTERN.match(file.name)
        if match and match["semantic"]:
            labels[(f"{int(match['patient']):03d}", int(match["week"]))] = file
            continue
        folder = next((part for part in relative.parts[:-1] if LABEL_FOLDER.search(part)), None)
        if folder is not None:
            log.warning("%s: skipped: in the label folder %s", file, folder)
            continue
        if not match and LABEL_NAME.search(NIFTI_NAME.sub("", file.name)):
            log.warning("%s: skipped: its name marks a label (%s), not an image", file,
                        LABEL_NAME.search(NIFTI_NAME.sub("", file.name)).group(0).strip("_-."))
            continue
        images.append((file, match))
    if not images:
        raise DataError(f"{path}: no .nii or .nii.gz images found")
    case_ids = unique_case_ids([file.relative_to(path) for file, _ in images])
    keys: dict[tuple[str, int], Path] = {}
    for file, match in images:
        if match:
            key = (f"{int(match['patient']):03d}", int(match["week"]))
            if key in keys:  # which of the two its label belongs to cannot be told
                raise DataError(f"{file}: a second image for patient {key[0]} week {key[1]} (first: {keys[key]})")
            keys[key] = file
    cases = []
    for (file, match), case_id in zip(images, case_ids):
        key = (f"{int(match['patient']):03d}", int(match["week"])) if match else None
        label = labels.pop(key, None) if key else None
        cases.append(Case(str(file), str(label) if label else None, case_id, key[0] if key else "",
                          key[1] if key else 0))
    for label in labels.values():
        log.warning("%s: label without image, skipped", label)
    return cases


def unique_case_ids(relative_paths: Sequence[Path]) -> list[str]:
    """One id per file, unique ignoring case: each file starts at the shortest form of its name
    and the files that still share an id move on to a longer form, until none do."""
    def forms(relative: Path) -> list[str]:
        folders = list(relative.parts[:-1])
        stem = NIFTI_NAME.sub("", relative.name)
        extension = relative.name[len(stem):].lstrip(".").replace(".", "_")
        return [case_id_from_path(relative), "__".join([*folders, case_id_from_path(relative)]),
                "__".join([*folders, stem]), "__".join([*folders, f"{stem}_{extension}"])]

    candidates = [forms(p) for p in relative_paths]
    level = [0] * len(candidates)
    while True:
        ids = [c[n] for c, n in zip(candidates, level)]
        counts = Counter(i.lower() for i in ids)
        clashing = [k for k, i in enumerate(ids) if counts[i.lower()] > 1 and level[k] < 3]
        if not clashing:
            break
        for k in clashing:
            level[k] += 1
    taken: set[str] = set()
    unique = []
    for case_id in ids:  # only names differing in case alone are left to tell apart
        final, copy = case_id, 2
        while final.lower() in taken:
            final, copy = f"{case_id}_{copy}", copy + 1
        taken.add(final.lower())
        unique.append(final)
    return unique


# ----------------------------------------------------------------------------- split

def split_patients(patients: Sequence[str], seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> dict[str, list[str]]:
    """Seeded patient-level split (default 6:2:2): no patient appears in two splits."""
    unique = sorted(set(patients))
    if len(unique) < 3:
        raise DataError(f"need at least 3 patients for a train/val/test split, found {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    n_val = max(1, round(fractions[1] * len(unique)))
    n_test = max(1, round(fractions[2] * len(unique)))
    n_train = len(unique) - n_val - n_test
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train:n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val:]),
    }


def make_folds(patients: Sequence[str], test: Sequence[str], folds: int, seed: int = 0) -> list[list[str]]:
    """The patients outside ``test`` in ``folds`` seeded, patient-level, disjoint folds."""
    remaining = sorted(set(patients) - set(test))
    if folds < 2 or folds > len(remaining):
        raise DataError(f"--folds {folds}: need 2 to {len(remaining)} folds for the {len(remaining)} non-test patients")
    order = np.random.default_rng(seed + 1).permutation(len(remaining))
    return [sorted(remaining[i] for i in order[k::folds]) for k in range(folds)]


def load_or_make_split(cases: Sequence[Case], split_file: str | Path, seed: int = 0, folds: int | None = None,
                       fold: int | None = None) -> dict[str, list[str]]:
    """The run's split as {train, val, test}: reuse ``split_file`` (splits.json) when present,
    otherwise make it and save it.

    Without folds: a seeded patient-level 6:2:2 split. With ``folds`` K: the test patients of that
    same split stay fixed, the others form K seeded folds, and fold ``fold`` is validated on its
    own patients and trained on the rest; splits.json records the test patients and all K folds,
    so every fold's run folder holds the same file.
    """
    split_file = Path(split_file)
    patients = sorted({c.patient for c in cases})
    if split_file.exists():
        try:
            stored = json.loads(split_file.read_text())
            if folds is not None:
                if len(stored["folds"]) != folds:
                    raise DataError(f"{split_file}: holds {len(stored['folds'])} folds, not --folds {folds}")
                split = resolve_fold(stored, fold)
            else:
                split = {part: list(stored[part]) for part in ("train", "val", "test")}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{split_file}: not a valid split file for this run ({error})") from None
    else:
        split = split_patients(patients, seed)
        stored = split
        if folds is not None:
            stored = {"test": split["test"], "folds": make_folds(patients, split["test"], folds, seed), "seed": seed}
            split = resolve_fold(stored, fold)
        split_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(split_file, json.dumps(stored, indent=2) + "\n")
    assigned = [p for part in ("train", "val", "test") for p in split[part]]
    if len(assigned) != len(set(assigned)):
        raise DataError(f"{split_file}: a patient is listed in two splits")
    unassigned = sorted(set(patients) - set(assigned))
    if unassigned:
        log.warning("%s: patients %s are in no split and are not used", split_file, ", ".join(unassigned))
    return split


def resolve_fold(stored: dict, fold: int | None) -> dict[str, list[str]]:
    folds = stored["folds"]
    if fold is None or not 0 <= fold < len(folds):
        raise DataError(f"--fold {fold}: must be 0..{len(folds) - 1}")
    train = sorted(p for k, part in enumerate(folds) if k != fold for p in part)
    return {"train": train, "val": list(folds[fold]), "test": list(stored["test"])}


def cases_in(cases: Sequence[Case], patients: Sequence[str]) -> list[Case]:
    wanted = set(patients)
    return [c for c in cases if c.patient in wanted]


# ----------------------------------------------------------------------------- transforms

def drop_trailing_singletons(volume):
    """HipMRI files may carry a trailing singleton 4th dimension: (X, Y, Z, 1) -> (X, Y, Z)."""
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    return volume


class CheckedNibabelReader(NibabelReader):
    """MONAI's NIfTI reader with one geometry: nibabel's affine.

    ``read`` replaces NibabelReader.read to check the header first (sform and qform must agree in
    voxel size; pixdim made the sform's where only the sform is set), then chains to MONAI's own
    header fix-up, as NibabelReader.read does. After the checks that fix-up can still bring
    pixdim in line, but finds nothing to rewrite in the affine.
    """

    def read(self, data, **kwargs):
        images = []
        self.filenames = ensure_tuple(data)
        for name in self.filenames:
            image = checked_image(name) if isinstance(name, nib.spatialimages.SpatialImage) else read_nifti_header(name)
            align_pixdim_with_affine(image)
            images.append(image_reader.correct_nifti_header_if_necessary(image))
        return images if len(images) > 1 else images[0]


class LoadValidated(mt.MapTransform):
    """Load image (and label) with MONAI's NIfTI reader and refuse a bad pair with a DataError.

    Written here because no MONAI transform checks what HipMRI needs: a trailing singleton 4th
    dimension is dropped; image and label must agree in shape and affine; labels must be whole
    numbers in 0..num_classes-1 (float storage is fine); intensities must be finite and not
    constant. Each failure is one line naming the file.
    """

    def __init__(self, keys: Sequence[str], num_classes: int = len(CLASS_NAMES)):
        super().__init__(keys, allow_missing_keys=True)
        self.num_classes = num_classes
        # MONAI's NibabelReader used directly: LoadImage would also instantiate every other reader
        # it knows, and with pydicom installed its nvImageCodec DICOM reader warns on every load.
        self.reader = CheckedNibabelReader()

    def load(self, source) -> torch.Tensor:
        """``source``: a path, or a nibabel image already in memory (the same checks, no file)."""
        path = source_name(source)
        try:
            array, meta = self.reader.get_data(self.reader.read(source))
            meta["filename_or_obj"] = path
            volume = MetaTensor.ensure_torch_and_prune_meta(np.asarray(array, dtype=np.float32), meta)
        except DataError:
            raise
        except Exception as error:  # nibabel raises many types for damaged files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"{path}: cannot be read as NIfTI ({reason[:200]})") from None
        volume = drop_trailing_singletons(volume)
        affine = np.asarray(volume.affine, dtype=np.float64)
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise DataError(f"{path}: the header's voxel-to-mm affine is not usable (not finite or singular)")
        if volume.ndim != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {tuple(volume.shape)}")
        if min(volume.shape) < 2:
            raise DataError(f"{path}: volume of shape {tuple(volume.shape)} is too small")
        return volume

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        image_path = source_name(item["image"])
        image = self.load(item["image"])
        array = image.as_tensor()
        if not torch.isfinite(array).all():
            raise DataError(f"{image_path}: image contains NaN or infinite intensities")
        # Finite but huge values (a damaged file, data read with a wrong type) overflow float32 sums
        # in area resizing and percentile scaling and come out as NaN (found by fuzzing).
        if float(array.abs().max()) > MAX_ABS_INTENSITY:
            raise DataError(f"{image_path}: image intensities reach {float(array.abs().max()):.3g}, "
                            f"beyond {MAX_ABS_INTENSITY:.0e}: a damaged file?")
        if float(array.max()) == float(array.min()):
            raise DataError(f"{image_path}: image is constant ({float(array.min())}): nothing to segment")
        label_like = label_like_values(array)
        if label_like is not None:
            raise DataError(f"{image_path}: looks like a label map, not an image (its only values are the whole "
                            f"numbers {label_like}); give the MR image")
        item["image"] = image
        if "label" in item:
            label_path = source_name(item["label"])
            label = self.load(item["label"])
            if tuple(label.shape) != tuple(image.shape):
                raise DataError(
                    # both files named: either may be the damaged one
                    f"{label_path}: label shape {tuple(label.shape)} differs from image shape {tuple(image.shape)} "
                    f"({image_path})"
                )
            if not torch.allclose(label.affine.double(), image.affine.double(), atol=1e-3, rtol=1e-4):
                raise DataError(f"{label_path}: label affine differs from the image's ({image_path})")
            values = label.as_tensor()
            if not torch.isfinite(values).all() or not torch.equal(values, values.round()):
                raise DataError(f"{label_path}: label values are not whole numbers")
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.num_classes:
                raise DataError(
                    f"{label_path}: label values {low}..{high} outside 0..{self.num_classes - 1}"
                )
            item["label"] = label
        return item


# ----------------------------------------------------------------------------- geometry
# One source of geometry: the NIfTI affine as nibabel reads it (the sform where its code is set,
# else the qform). Spacing is its column norms and a voxel's volume |det|, never the header's
# pixdim, which writers do not always keep in step with the affine.

SFORM_QFORM_TOLERANCE = 1e-3  # relative difference in voxel size between the two header forms


def voxel_spacing(affine) -> tuple[float, ...]:
    """Voxel size in mm along each array axis: the column norms of the affine's 3x3 part."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(s) for s in np.sqrt((linear ** 2).sum(axis=0)))


def voxel_volume_ml(affine) -> float:
    """One voxel's volume in millilitres: |det| of the affine's 3x3 part / 1000."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def check_header_forms(image: nib.Nifti1Image, path: str | Path) -> None:
    """Refuse a NIfTI whose sform and qform are both set but disagree in voxel size.

    Readers disagree on which form wins (nibabel and this project take the sform; MONAI's reader
    rewrites the sform from the qform when only the qform matches pixdim; ITK has its own rule), so
    such a file has no single geometry and its volumes and distances would depend on the tool.
    """
    header = image.header
    if not hasattr(header, "get_sform") or int(header["sform_code"]) == 0 or int(header["qform_code"]) == 0:
        return
    try:
        sform_spacing = np.asarray(voxel_spacing(header.get_sform()))
        qform_spacing = np.asarray(voxel_spacing(header.get_qform()))
    except Exception as error:  # nibabel raises ValueError and others on a damaged quaternion
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: the header's sform or qform cannot be read ({reason[:160]}): a damaged header?") from None
    if np.any(np.abs(sform_spacing - qform_spacing) > SFORM_QFORM_TOLERANCE * np.maximum(qform_spacing, 1e-12)):
        raise DataError(f"{path}: the header's sform and qform disagree in voxel size "
                        f"({[round(float(s), 4) for s in sform_spacing]} mm against "
                        f"{[round(float(s), 4) for s in qform_spacing]} mm), so tools read it differently; "
                        "rewrite the header with one geometry (e.g. nibabel: img.set_qform(img.get_sform()))")


def align_pixdim_with_affine(image: nib.Nifti1Image) -> None:
    """Make the header's pixdim the affine's voxel size where only the sform is set (qform code 0).

    MONAI's header fix-up trusts pixdim: on such a file, whose pixdim a writer left stale, it
    would replace the sform (nibabel's geometry) with a qform built from that pixdim."""
    header = image.header
    if not hasattr(header, "get_sform") or int(header["sform_code"]) == 0 or int(header["qform_code"]) != 0:
        return
    spatial = min(3, len(header.get_zooms()))
    spacing = voxel_spacing(image.affine)[:spatial]
    if not np.allclose(header.get_zooms()[:spatial], spacing):
        header.set_zooms(tuple(spacing) + tuple(header.get_zooms()[spatial:]))


IN_MEMORY = "in-memory image"


def source_name(source) -> str:
    """How messages and metadata name an input: its path, or for a nibabel image in memory the
    file it came from where it has one."""
    if isinstance(source, nib.spatialimages.SpatialImage):
        return str(source.get_filename() or IN_MEMORY)
    return str(source)


def checked_image(image: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """A nibabel image in memory as read_nifti_header gives a file: NIfTI, its geometry checked.
    A copy sharing the voxels, since the reader adjusts the header (the caller's stays as it was)."""
    if isinstance(image, nib.Nifti1Image):
        copy = nib.Nifti1Image(image.dataobj, image.affine, image.header.copy())
    else:
        copy = nib.Nifti1Image.from_image(image)
    check_header_forms(copy, source_name(image))
    return copy


def read_nifti_header(path: str | Path) -> nib.Nifti1Image:
    """The NIfTI image object (header read, voxels not yet), with its geometry checked."""
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for damaged files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot be read as NIfTI ({reason[:200]})") from None
    check_header_forms(image, path)
    return image


MAX_LABEL_LIKE_VALUES = 16  # an MR image has hundreds of distinct intensities; a label map a handful


def label_like_values(array: torch.Tensor) -> list[int] | None:
    """The values of a volume that holds only a few small whole numbers (a label map given as the
    image), or None for anything an MR image can be. The cheap checks run first: most images fail
    the whole-number or range test without counting distinct values."""
    if float(array.min()) < 0 or float(array.max()) > 255 or not torch.equal(array, array.round()):
        return None
    values = torch.unique(array)
    if len(values) > MAX_LABEL_LIKE_VALUES:
        return None
    return [int(v) for v in values]


def lps_geometry(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing in mm) of a NIfTI file in LPS array order, from its header alone."""
    header_image = read_nifti_header(path)
    affine = header_image.affine
    shape = drop_trailing_singletons(np.empty(header_image.shape, dtype=bool)).shape
    zooms = voxel_spacing(affine)
    lps_shape, lps_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for source_axis, (target_axis, _) in enumerate(nib.orientations.io_orientation(affine)):
        lps_shape[int(target_axis)] = int(shape[source_axis])
        lps_spacing[int(target_axis)] = float(zooms[source_axis])
    return tuple(lps_shape), tuple(lps_spacing)


def choose_spacing(cases: Sequence[Case], spacing: Sequence[float] | None = None,
                   spatial_size: Sequence[int] | None = None) -> tuple[list[float], str]:
    """The target voxel spacing in mm (LPS order) and how it was derived.

    ``spacing`` is taken as given. ``spatial_size`` is the array size a median training volume
    should get: spacing = median field of view / size. Neither: twice the median spacing, which is
    half resolution on every axis (128 x 128 x 64 for a median HipMRI volume).
    """
    if spacing is not None:
        return [float(s) for s in spacing], "given with --spacing"
    geometry = [lps_geometry(c.image) for c in cases]
    median_spacing = np.median([g[1] for g in geometry], axis=0)
    if spatial_size is not None:
        median_fov = np.median([np.multiply(g[0], g[1]) for g in geometry], axis=0)
        derived = [float(f / n) for f, n in zip(median_fov, spatial_size)]
        return derived, (f"median training field of view {[round(float(f), 2) for f in median_fov]} mm "
                         f"/ --spatial-size {list(spatial_size)}")
    return ([float(2 * s) for s in median_spacing],
            f"2 x median training spacing {[round(float(s), 4) for s in median_spacing]} mm")


AREA_MIN_FACTOR = 1.5  # see ResampleToSpacingd


class ResampleToSpacingd(mt.MapTransform):
    """Resample image and label to a target voxel spacing in mm, keeping the field of view.

    The output shape is round(shape x spacing / target) per axis (nnU-Net's rule) and MONAI's
    Resize does the resampling, so the field of view is kept exactly and the affine follows; the
    voxel size then equals the target within half a voxel over the whole field of view. Image:
    area averaging when every axis shrinks by at least ``AREA_MIN_FACTOR`` (the anti-aliased
    downsampling, one pass), trilinear with Gaussian anti-aliasing otherwise (area averaging's
    windows are whole source voxels, at least two wide at any non-integer ratio, so at a factor
    near 1 it would blur like a 2x downsampling; the Gaussian's width follows the factor). Label: as nnU-Net does, each class's mask is resampled
    exactly as the image is, and the arg-max of the resampled masks is the new label. It is then
    centre-aligned with the image at any factor (nearest-neighbour resizing is centre-aligned only
    for odd factors, half a source voxel off at the default factor 2) and never invents a class at
    a border, as resampling the label values themselves would (prostate 5 averaged with body 1
    reads as bladder 3). Not Spacingd: it has no area mode and snaps the extent to whole target
    voxels from the first voxel centre, which shifts the grid against the field of view.
    """

    def __init__(self, spacing: Sequence[float], num_classes: int = len(CLASS_NAMES), image_key: str = "image",
                 label_key: str = "label"):
        super().__init__((image_key, label_key), allow_missing_keys=True)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.num_classes = num_classes
        self.image_key, self.label_key = image_key, label_key

    def target_shape(self, image) -> tuple[int, ...]:
        current = voxel_spacing(image.affine)
        shape = tuple(int(round(n * s / t)) for n, s, t in zip(image.shape[1:], current, self.spacing))
        if min(shape) < 2 or max(shape) > MAX_RESAMPLED_AXIS:
            # A damaged header's voxel size would otherwise ask for a single voxel or for gigabytes.
            raise DataError(f"{image.meta.get('filename_or_obj', 'volume')}: voxel size "
                            f"{[round(float(s), 4) for s in current]} mm x shape {list(image.shape[1:])} gives "
                            f"{list(shape)} voxels at {self.spacing.tolist()} mm: a damaged header?")
        return shape

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        image = item[self.image_key]
        shape = self.target_shape(image)
        shrinking = all(old >= AREA_MIN_FACTOR * new for new, old in zip(shape, image.shape[1:]))
        image_resize = (mt.Resize(shape, mode="area") if shrinking
                        else mt.Resize(shape, mode="trilinear", anti_aliasing=True))
        item[self.image_key] = image_resize(image)
        if self.label_key in item:
            item[self.label_key] = self.resample_label(item[self.label_key], image_resize)
        return item

    def resample_label(self, label: MetaTensor, resize: mt.Resize) -> MetaTensor:
        """(1, X, Y, Z) label -> one mask per class, each resampled by ``resize`` (the image's),
        -> arg-max (first class on ties), as float32 with the resized geometry."""
        values = label.as_tensor()
        masks = MetaTensor(torch.cat([(values == c) for c in range(self.num_classes)]).float(), meta=label.meta)
        resized = resize(masks)
        return MetaTensor(resized.as_tensor().argmax(0, keepdim=True).float(), meta=resized.meta)


def preprocessing(spacing: Sequence[float], num_classes: int = len(CLASS_NAMES)) -> mt.Compose:
    """Deterministic preprocessing shared by training, validation and prediction.

    Load and validate -> channel first -> LPS orientation -> resample to ``spacing`` in mm
    (``ResampleToSpacingd``; volumes keep their own field of view and so their own array size) ->
    percentile intensity normalisation (on the resampled volume: same result, a fraction of the
    cost). Works on items with or without a label.
    """
    keys = ("image", "label")
    return mt.Compose([
        LoadValidated(keys, num_classes),
        mt.EnsureChannelFirstd(keys, channel_dim="no_channel", allow_missing_keys=True),
        # Axis labels passed explicitly: MONAI warns that its default will change.
        mt.Orientationd(keys, axcodes=ORIENTATION, labels=(("L", "R"), ("P", "A"), ("I", "S")),
                        allow_missing_keys=True),
        ResampleToSpacingd(spacing, num_classes),
        # MRI has no absolute intensity scale; robust percentiles ignore bright outliers.
        mt.ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        mt.EnsureTyped(keys, dtype=torch.float32, track_meta=True, allow_missing_keys=True),
    ])


def augmentation(patch_size: Sequence[int] | None, num_classes: int = len(CLASS_NAMES),
                 class_crop_ratios: Sequence[float] | None = None, spatial_on_device: bool = False) -> mt.Compose:
    """Random training augmentation applied after the cached preprocessing (MONAI transforms).

    Crop of ``patch_size`` (centred on each class in turn, so rare organs are seen often; none
    for whole-volume training) -> elastic deformation with small rotation and scaling in one
    resampling -> left-right flip only (flipping superior-inferior or anterior-posterior makes
    anatomy that never occurs) -> intensity. Rotation ranges are radians. With
    ``spatial_on_device`` only the crop runs here and ``DeviceAugmentation`` does the rest on the
    training device, batched.
    """
    keys = ("image", "label")
    ratios = list(class_crop_ratios) if class_crop_ratios is not None else [1.0] * num_classes
    crop = [] if patch_size is None else [
        mt.RandCropByLabelClassesd(keys, label_key="label", spatial_size=tuple(patch_size), ratios=ratios,
                                   num_classes=num_classes, num_samples=1, allow_smaller=True, warn=False,
                                   indices_key=CROP_INDICES_KEY, allow_missing_keys=True),
        mt.SpatialPadd(keys, spatial_size=tuple(patch_size)),
        mt.DeleteItemsd(CROP_INDICES_KEY),  # large index arrays: no need to collate them
    ]
    if spatial_on_device:
        return mt.Compose(crop)
    return mt.Compose(crop + [
        mt.Rand3DElasticd(keys, sigma_range=(5.0, 7.0), magnitude_range=(50.0, 150.0), prob=0.3,
                          rotate_range=(0.15, 0.15, 0.15), scale_range=(0.1, 0.1, 0.1),
                          mode=("bilinear", "nearest"), padding_mode="zeros"),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=0),  # axis 0 is left-right in LPS order
        mt.RandAdjustContrastd("image", prob=0.2, gamma=(0.7, 1.5)),
        mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        mt.RandGaussianNoised("image", prob=0.15, std=0.03),
    ])


class DeviceAugmentation:
    """The same augmentation as ``augmentation`` (after the crop), for a whole batch on its device.

    Written by hand because MONAI's Rand3DElastic works per sample, smooths a dense random field
    with a Gaussian at full size, and runs in the loader's CPU workers: ~0.4 s per 64x64x32 crop,
    far slower than a training step. Here the elastic field is drawn on a coarse grid of control
    points and upsampled trilinearly (smooth by construction), composed with a small rotation
    (radians) and scaling, and applied with one ``grid_sample`` per batch: image bilinear, label
    nearest (never invents classes). Then a left-right flip and intensity changes (gamma,
    scale, shift, Gaussian noise) with the probabilities of the MONAI pipeline.
    """

    def __init__(self, rotate_range: float = 0.15, scale_range: float = 0.1, elastic_prob: float = 0.3,
                 elastic_magnitude: float = 2.0, control_points: int = 5, spatial_prob: float = 0.5,
                 flip_prob: float = 0.5):
        self.rotate_range = rotate_range  # radians, about each axis
        self.scale_range = scale_range
        self.elastic_prob = elastic_prob
        self.elastic_magnitude = elastic_magnitude  # standard deviation of the displacement, in voxels
        self.control_points = control_points
        self.spatial_prob = spatial_prob
        self.flip_prob = flip_prob

    @staticmethod
    def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
        """(B, 3) angles in radians -> (B, 3, 3) rotations about the three axes, composed."""
        cos, sin = angles.cos(), angles.sin()
        one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
        rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1)
        ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1)
        rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1)
        return rx.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rz.view(-1, 3, 3)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, device = images.shape[0], images.device
        size = images.shape[2:]

        def uniform(*shape, low=0.0, high=1.0):
            return torch.rand(*shape, generator=generator, device=device) * (high - low) + low

        spatial = uniform(batch) < self.spatial_prob
        elastic = uniform(batch) < self.elastic_prob
        if bool(spatial.any() or elastic.any()):
            angles = uniform(batch, 3, low=-self.rotate_range, high=self.rotate_range) * spatial[:, None]
            scales = 1 + uniform(batch, 3, low=-self.scale_range, high=self.scale_range) * spatial[:, None]
            # Rotate in voxel units (axes have different lengths), then express in grid_sample's
            # normalised coordinates, whose axis order is (W, H, D), i.e. (Z, Y, X) here.
            half = torch.tensor([s / 2 for s in reversed(size)], device=device, dtype=torch.float32)
            linear = self.rotation_matrices(angles) * scales[:, None, :]
            linear = linear * half[None, None, :] / half[None, :, None]  # S^-1 R S, S = diag(half)
            theta = torch.cat([linear, torch.zeros(batch, 3, 1, device=device)], dim=2)
            grid = torch.nn.functional.affine_grid(theta, [batch, 1, *size], align_corners=False)
            coarse = torch.randn(batch, 3, *(self.control_points,) * 3, generator=generator, device=device)
            coarse = coarse * self.elastic_magnitude * elastic[:, None, None, None, None]
            displacement = torch.nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
            grid = grid + displacement.permute(0, 2, 3, 4, 1) / half  # voxels -> normalised units
            images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                                     align_corners=False)
            labels = torch.nn.functional.grid_sample(labels, grid, mode="nearest", padding_mode="zeros",
                                                     align_corners=False)
        flip = (uniform(batch) < self.flip_prob)[:, None, None, None, None]
        if bool(flip.any()):
            images = torch.where(flip, images.flip(2), images)  # dim 2 is left-right (LPS array order)
            labels = torch.where(flip, labels.flip(2), labels)

        def factor(probability, low, high, neutral):
            chosen = (uniform(batch) < probability).view(batch, 1, 1, 1, 1)
            return torch.where(chosen, uniform(batch, low=low, high=high).view(batch, 1, 1, 1, 1), neutral)

        images = images.clamp_min(0) ** factor(0.2, 0.7, 1.5, 1.0)  # gamma
        images = images * factor(0.5, 0.9, 1.1, 1.0) + factor(0.5, -0.1, 0.1, 0.0)
        noisy = (uniform(batch) < 0.15).view(batch, 1, 1, 1, 1)
        if bool(noisy.any()):
            images = images + torch.randn(images.shape, generator=generator, device=device) * 0.03 * noisy
        return images, labels


CROP_INDICES_KEY = "label_cls_indices"


def cached_dataset(cases: Sequence[Case], spacing: Sequence[float], num_classes: int = len(CLASS_NAMES),
                   workers: int = 0, progress: bool = False, crop_indices: bool = False) -> CacheDataset:
    """Preprocessed volumes held in memory: epochs do not reload or resample anything.

    ``crop_indices`` also caches each class's voxel indices, so that class-centred random crops
    do not search the label volume again at every step.
    """
    transform = preprocessing(spacing, num_classes)
    if crop_indices:
        transform = mt.Compose([*transform.transforms, mt.ClassesToIndicesd(
            "label", num_classes=num_classes, indices_postfix="_cls_indices")])
    threads_before = set(threading.enumerate())
    try:
        return CacheDataset([c.as_dict() for c in cases], transform=transform,
                            cache_rate=1.0, num_workers=max(workers, 1), progress=progress, copy_cache=False)
    except Exception:
        # MONAI fills the cache in a ThreadPool whose terminate() does not join its threads: after a
        # bad volume they go on with the one they hold while the CLI exits, and Python ending a daemon
        # thread inside torch code aborts the process ("terminate called without an active
        # exception", SIGABRT instead of exit code 2). Let them finish first (they take no new work).
        for thread in set(threading.enumerate()) - threads_before:
            if isinstance(thread, DummyProcess):
                thread.join(timeout=60)
        raise


def class_voxel_counts(dataset: CacheDataset, num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for item in dataset._cache:  # the preprocessed training labels, already in memory
        counts += np.bincount(item["label"].as_tensor().reshape(-1).long().numpy(), minlength=num_classes)[:num_classes]
    return counts


def class_weights_from_counts(counts: np.ndarray, power: float) -> np.ndarray:
    """Inverse class frequency to the power ``power`` (0.5: inverse square root), normalised to
    mean 1.

    Full inverse frequency (power 1) would weight prostate (~0.1 % of voxels) ~600x background
    and make the cross-entropy unstable; the square root weights it ~25x, the fourth root ~5x.
    A class absent from the training labels gets the largest weight of the others.
    """
    frequency = counts / max(counts.sum(), 1)
    weights = np.zeros(len(counts), dtype=np.float64)
    present = frequency > 0
    weights[present] = frequency[present] ** -power
    if (~present).any():
        weights[~present] = weights[present].max() if present.any() else 1.0
    return (weights / weights.mean()).astype(np.float32)
