"""DICOM image series as a scanner or PACS writes them: which series under a folder can be read as
one volume, and why each of the others cannot.

    scan = scan_series("exports/patient_7")         # never raises for a bad series
    for skipped in scan.skipped: print(skipped.line())
    volume_series = scan.usable                      # DicomSeries, each one regular stack

A study folder holds more than the T2 the model wants: localizers, other echoes, a planning CT,
earlier RT Structure Sets, copies of the same instances. Each series is judged on its own, so one
odd series does not stop the others; the run stops only when nothing usable remains
(``find_series``).

Before a stack is called irregular, the instances are de-duplicated by SOPInstanceUID and a series
whose positions repeat is split along the dimensions scanners interleave in one series: echo
(EchoNumbers / EchoTime), diffusion b-value (DiffusionBValue, Siemens (0019,100C), GE (0043,1039)),
temporal position and acquisition number. Each part that forms a regular stack is a case of its
own. Single-frame images and multi-frame (Enhanced and Legacy Converted Enhanced) images are read
through one frame model, the latter through their per-frame and shared functional groups, so both
give the same grid for the same data.

Geometry: DICOM patient coordinates are LPS, NIfTI's (as nibabel writes them) are RAS, so
world_RAS = diag(-1, -1, 1) @ world_LPS. Pixel (row r, column c) of a frame lies at
ImagePositionPatient + c * PixelSpacing[1] * row_cosine + r * PixelSpacing[0] * column_cosine.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pelvicseg.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
MR_CLASSES = {
    UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    UID("1.2.840.10008.5.1.4.1.1.4.1"),  # Enhanced MR Image Storage
    UID("1.2.840.10008.5.1.4.1.1.4.4"),  # Legacy Converted Enhanced MR Image Storage
}
# read like MR so that --allow-modality can take them; the modality policy decides whether they are
OTHER_VOLUME_CLASSES = {
    UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    UID("1.2.840.10008.5.1.4.1.1.2.1"),  # Enhanced CT Image Storage
    UID("1.2.840.10008.5.1.4.1.1.2.2"),  # Legacy Converted Enhanced CT Image Storage
    UID("1.2.840.10008.5.1.4.1.1.128"),  # Positron Emission Tomography Image Storage
    UID("1.2.840.10008.5.1.4.1.1.130"),  # Enhanced PET Image Storage
    UID("1.2.840.10008.5.1.4.1.1.128.1"),  # Legacy Converted Enhanced PET Image Storage
}
VOLUME_IMAGE_CLASSES = MR_CLASSES | OTHER_VOLUME_CLASSES
ORIENTATION_TOLERANCE = 1e-4  # direction cosines are decimal strings, usually 6 or more digits
SPACING_TOLERANCE = 0.01  # share of the slice spacing that positions may deviate by
# Siemens' CSA-less b-value and GE's "slop_int_6" (first value, sometimes offset by 1e9)
SIEMENS_B_VALUE = (0x0019, 0x100C)
GE_B_VALUE = (0x0043, 0x1039)
SPLIT_DIMENSIONS = ("echo", "b-value", "temporal position", "acquisition")


@dataclass(frozen=True)
class Frame:
    """One 2D image: a single-frame file, or one frame (``number``, 1-based) of a multi-frame file."""
    path: Path
    number: int | None
    sop_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    slope: float
    intercept: float
    split: tuple  # (echo, b-value, temporal position, acquisition): the values a series may interleave
    transfer_syntax: str


@dataclass(frozen=True)
class DicomSeries:
    """One regular stack: its frames sorted along the slice normal and its grid.

    ``shape`` and ``affine`` describe the volume that ``dicom_pixels.load_series`` returns: array
    axes (column i, row j, slice k) and a 4x4 RAS affine, as nibabel wants them. Per slice k:
    ``files[k]``, ``frame_numbers[k]`` (None for single-frame files) and ``sop_instance_uids[k]``.
    ``part`` names the echo, b-value, ... where the series was split, else it is empty.
    """
    folder: Path
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    case_id: str
    sop_class_uid: str
    files: tuple[Path, ...] = field(repr=False)
    sop_instance_uids: tuple[str, ...] = field(repr=False)
    shape: tuple[int, int, int]
    affine: np.ndarray = field(compare=False, repr=False)
    patient_id: str = ""
    series_number: int | None = None
    series_description: str = ""
    modality: str = ""
    part: str = ""
    frame_numbers: tuple[int | None, ...] = field(default=(), repr=False)
    positions: np.ndarray = field(default=None, compare=False, repr=False)  # (slices, 3) LPS mm
    orientation: tuple[float, ...] = field(default=(), repr=False)
    pixel_spacing: tuple[float, float] = field(default=(), repr=False)  # between rows, between columns
    rescale: tuple[tuple[float, float], ...] = field(default=(), repr=False)  # (slope, intercept) per slice

    @property
    def is_multiframe(self) -> bool:
        return any(number is not None for number in self.frame_numbers)

    def describe(self) -> str:
        """'series 3 (T2 AX, 1.2.3...), echo 2': how a user finds it in a viewer."""
        return describe_series(self.series_number, self.series_description, self.series_uid) + (
            f", {self.part}" if self.part else "")

    def where(self) -> str:
        return f"{self.folder}: {self.describe()}"


@dataclass(frozen=True)
class SkippedSeries:
    """A series (or part of one) that is not predicted, and why."""
    folder: Path
    series: str  # as describe_series writes it
    reason: str
    files: int = 0

    def line(self) -> str:
        return f"skipped {self.folder}: {self.series}: {self.reason}"

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "series": self.series, "reason": self.reason, "files": self.files}


@dataclass
class SeriesScan:
    """What ``scan_series`` found under ``folder``: the usable stacks and the rejected series."""
    folder: Path
    usable: list[DicomSeries]
    skipped: list[SkippedSeries]

    def nothing_usable(self) -> DataError:
        reasons = "; ".join(f"{s.series}: {s.reason}" for s in self.skipped) or "found no DICOM files"
        return DataError(f"{self.folder}: no usable image series ({reasons})")


class Rejected(Exception):
    """Why a stack of frames is not one regular volume (a reason, without the series' name)."""


# ----------------------------------------------------------------------------- reading headers

def read_dicom(path: Path, pixels: bool = True) -> Dataset:
    """A DICOM file, also one without preamble and file meta information (older exports):
    its transfer syntax is then the encoding that pydicom found."""
    dataset = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    if "TransferSyntaxUID" not in dataset.file_meta:
        implicit_vr, little_endian = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian)
    return dataset


def read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file (pixel data skipped), or None for anything else."""
    try:
        with open(path, "rb") as handle:
            has_magic = handle.read(132)[128:132] == b"DICM"
        header = read_dicom(path, pixels=False)
        # without the DICM magic, forcing turns any file into some kind of dataset: keep only
        # those that name a SOP class
        if not has_magic and "SOPClassUID" not in header:
            return None
        return header
    except (InvalidDicomError, OSError, ValueError, KeyError, TypeError, EOFError, OverflowError, AttributeError):
        return None  # not DICOM, or so broken that it cannot be part of a series


def candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def is_dicom_folder(path: str | Path) -> bool:
    """True for a folder that holds DICOM files and no NIfTI files."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = candidate_files(path)
    if any(is_nifti(p) for p in files):
        return False
    return any(read_header(p) is not None for p in files)


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("._") or "series"


def describe_series(number, description: str, uid: str) -> str:
    description = str(description or "").strip()
    label = f"{description}, " if description else ""
    return f"series {'' if number is None else number} ({label}{uid})"


def describe(header: Dataset) -> str:
    return describe_series(header.get("SeriesNumber", ""), header.get("SeriesDescription", ""),
                           header.get("SeriesInstanceUID", "no SeriesInstanceUID"))


def undecodable_reason(transfer_syntax: str) -> str | None:
    """Why pixel data in this transfer syntax cannot be decoded here, or None when it can."""
    transfer_syntax = UID(transfer_syntax)
    if not transfer_syntax.is_compressed:
        return None
    try:
        decoder = pydicom.pixels.get_decoder(transfer_syntax)
    except NotImplementedError:
        return f"pixel data compressed as {transfer_syntax.name}, which no decoder supports"
    if not decoder.is_available:
        options = " or ".join(decoder.missing_dependencies)  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and ..."
        return f"pixel data compressed as {transfer_syntax.name} cannot be decoded (install {options})"
    return None


# ----------------------------------------------------------------------------- frames

def _floats(value) -> tuple[float, ...] | None:
    if value in (None, ""):
        return None
    try:
        return tuple(float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue))
                                        else [value]))
    except (TypeError, ValueError):
        return None


def _number(value) -> float | None:
    values = _floats(value)
    return values[0] if values else None


def _item(sequence_owner: Dataset | None, keyword: str) -> Dataset | None:
    if sequence_owner is None or keyword not in sequence_owner or not sequence_owner.get(keyword):
        return None
    return sequence_owner.get(keyword)[0]


def _b_value(*datasets: Dataset | None) -> float | None:
    for dataset in datasets:
        if dataset is None:
            continue
        for keyword in ("DiffusionBValue",):
            if dataset.get(keyword) not in (None, ""):
                return _number(dataset.get(keyword))
        diffusion = _item(dataset, "MRDiffusionSequence")
        if diffusion is not None and diffusion.get("DiffusionBValue") not in (None, ""):
            return _number(diffusion.DiffusionBValue)
        if SIEMENS_B_VALUE in dataset:
            value = _number(_decoded(dataset[SIEMENS_B_VALUE].value))
            if value is not None:
                return value
        if GE_B_VALUE in dataset:
            value = _number(_decoded(dataset[GE_B_VALUE].value))
            if value is not None:
                return value % 1e9 if value >= 1e9 else value  # GE adds 1e9 in some versions
    return None


def _decoded(value):
    """A private element read without its dictionary: bytes of a decimal or integer string."""
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace").strip("\x00 ")
        return text.split("\\") if "\\" in text else text
    return value


def _first(keyword: str, *datasets: Dataset | None):
    for dataset in datasets:
        if dataset is not None and dataset.get(keyword) not in (None, ""):
            return dataset.get(keyword)
    return None


def frames_of(path: Path, header: Dataset) -> list[Frame]:
    """The frames of one file: itself for a single-frame image, each frame of a multi-frame one
    with the per-frame functional group where there is one, else the shared one."""
    transfer_syntax = str(header.file_meta.TransferSyntaxUID)
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    uid = str(header.get("SOPInstanceUID", ""))
    if "PerFrameFunctionalGroupsSequence" not in header and "SharedFunctionalGroupsSequence" not in header:
        echo = (_number(header.get("EchoNumbers")), _number(header.get("EchoTime")))
        split = (echo, _b_value(header), _number(header.get("TemporalPositionIdentifier")),
                 _number(header.get("AcquisitionNumber")))
        return [Frame(path, None, uid, _floats(header.get("ImagePositionPatient")),
                      _floats(header.get("ImageOrientationPatient")), _floats(header.get("PixelSpacing")),
                      rows, columns, _number(header.get("RescaleSlope")) or 1.0,
                      _number(header.get("RescaleIntercept")) or 0.0, split, transfer_syntax)]
    shared = _item(header, "SharedFunctionalGroupsSequence")
    per_frame = list(header.get("PerFrameFunctionalGroupsSequence") or [])
    count = int(header.get("NumberOfFrames") or len(per_frame) or 1)
    shared_converted = _item(shared, "UnassignedSharedConvertedAttributesSequence")
    frames = []
    for index in range(count):
        own = per_frame[index] if index < len(per_frame) else None

        def group(keyword, own=own):  # the frame's own functional group, else the shared one
            return _item(own, keyword) or _item(shared, keyword)

        converted = _item(own, "UnassignedPerFrameConvertedAttributesSequence")
        position = group("PlanePositionSequence")
        orientation = group("PlaneOrientationSequence")
        measures = group("PixelMeasuresSequence")
        transformation = group("PixelValueTransformationSequence")
        echo_item = group("MREchoSequence")
        content = group("FrameContentSequence")
        sources = (converted, shared_converted, header)  # legacy converted: the single-frame attributes
        echo = (_number(_first("EchoNumbers", *sources)),
                _number(_first("EffectiveEchoTime", echo_item) or _first("EchoTime", *sources)))
        temporal = _number(_first("TemporalPositionIndex", content) or _first("TemporalPositionIdentifier", *sources))
        acquisition = _number(_first("FrameAcquisitionNumber", content) or _first("AcquisitionNumber", *sources))
        split = (echo, _b_value(own, shared, *sources), temporal, acquisition)
        frames.append(Frame(
            path, index + 1, uid,
            _floats(position.get("ImagePositionPatient")) if position is not None else None,
            _floats(orientation.get("ImageOrientationPatient")) if orientation is not None else None,
            _floats(measures.get("PixelSpacing")) if measures is not None else None,
            rows, columns,
            (_number(transformation.get("RescaleSlope")) if transformation is not None else None)
            or _number(header.get("RescaleSlope")) or 1.0,
            (_number(transformation.get("RescaleIntercept")) if transformation is not None else None)
            or _number(header.get("RescaleIntercept")) or 0.0,
            split, transfer_syntax))
    return frames


# ----------------------------------------------------------------------------- one stack

@dataclass
class Stack:
    frames: list[Frame]
    affine: np.ndarray
    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]


def regular_stack(frames: Sequence[Frame], image_type: Sequence[str] = ()) -> Stack:
    """``frames`` sorted along their normal as one regular volume; raises Rejected with the reason."""
    if len(frames) == 1:
        raise Rejected("a single slice, not a volume")
    for frame in frames:
        for name, value in (("ImagePositionPatient", frame.position), ("ImageOrientationPatient", frame.orientation),
                            ("PixelSpacing", frame.pixel_spacing)):
            if value is None:
                raise Rejected(f"{_frame_name(frame)} has no {name}")
        if not frame.rows or not frame.columns:
            raise Rejected(f"{_frame_name(frame)} has no Rows or Columns")
        reason = undecodable_reason(frame.transfer_syntax)
        if reason:
            raise Rejected(f"{_frame_name(frame)}: {reason}")
    orientations = np.array([frame.orientation for frame in frames], dtype=float)
    if orientations.shape[1] != 6 or np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        distinct = len(np.unique(np.round(orientations, 3), axis=0)) if orientations.shape[1] == 6 else "several"
        localizer = "ImageType LOCALIZER, " if "LOCALIZER" in {str(v).upper() for v in image_type} else ""
        raise Rejected(f"mixed orientations: {distinct} different ImageOrientationPatient values in one series "
                       f"({localizer}a three-plane localizer?)")
    row_cosine, column_cosine = orientations[0, :3], orientations[0, 3:]
    row_cosine, column_cosine = row_cosine / np.linalg.norm(row_cosine), column_cosine / np.linalg.norm(column_cosine)
    if abs(row_cosine @ column_cosine) > 1e-3:
        raise Rejected("ImageOrientationPatient's row and column directions are not perpendicular")
    normal = np.cross(row_cosine, column_cosine)

    sizes = {(frame.rows, frame.columns) for frame in frames}
    pixel_spacings = np.array([frame.pixel_spacing for frame in frames], dtype=float)
    if len(sizes) > 1 or pixel_spacings.shape[1] != 2 or np.abs(pixel_spacings - pixel_spacings[0]).max() > 1e-4:
        raise Rejected("slices differ in size or pixel spacing")

    positions = np.array([frame.position for frame in frames], dtype=float)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    positions, along_normal = positions[order], along_normal[order]
    frames = [frames[i] for i in order]
    slice_spacing = check_slice_spacing(along_normal)
    # a stack sheared sideways (gantry tilt) has no orthogonal affine; NIfTI's qform cannot hold it
    sideways = (positions - positions[0]) - np.outer(along_normal - along_normal[0], normal)
    if np.abs(sideways).max() > SPACING_TOLERANCE * slice_spacing + 1e-3:
        raise Rejected("slices are not stacked along their normal (gantry tilt or a sheared stack)")

    row_spacing, column_spacing = pixel_spacings[0]  # DICOM order: between rows, then between columns
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing  # i: along a row, from column to column
    lps[:3, 1] = column_cosine * row_spacing  # j: down a column, from row to row
    lps[:3, 2] = normal * slice_spacing
    lps[:3, 3] = positions[0]
    return Stack(frames, LPS_TO_RAS @ lps, positions, tuple(orientations[0]),
                 (float(row_spacing), float(column_spacing)))


def check_slice_spacing(along_normal: np.ndarray) -> float:
    """The slice spacing (mm); raises Rejected for duplicate, missing or unevenly spaced slices."""
    gaps = np.diff(along_normal)
    spacing = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE * spacing, 1e-3)
    if gaps.min() <= tolerance:
        at = along_normal[int(np.argmin(gaps))]
        raise Rejected(f"two slices at the same position ({at:.2f} mm along the normal)")
    irregular = np.flatnonzero(np.abs(gaps - spacing) > tolerance)
    if irregular.size == 0:
        return float((along_normal[-1] - along_normal[0]) / (len(along_normal) - 1))
    multiples = gaps[irregular] / spacing
    if np.all(np.abs(multiples - np.round(multiples)) * spacing <= tolerance):
        missing = int(np.round(multiples).sum() - len(irregular))
        first_gap = irregular[0]
        raise Rejected(f"{missing} missing slice(s) (first gap between {along_normal[first_gap]:.2f} and "
                       f"{along_normal[first_gap + 1]:.2f} mm along the normal; spacing {spacing:.3f} mm, "
                       f"{len(along_normal)} slices present)")
    raise Rejected(f"unevenly spaced slices (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm)")


def _frame_name(frame: Frame) -> str:
    return frame.path.name + (f" frame {frame.number}" if frame.number is not None else "")


# ----------------------------------------------------------------------------- splitting a series

def _part_label(dimension: str, value) -> tuple[str, str]:
    """(what a reader sees, what a case id gets) for one value of a split dimension."""
    if dimension == "echo":
        number, echo_time = value
        text = " ".join(filter(None, [f"echo {number:g}" if number is not None else "",
                                      f"(TE {echo_time:g} ms)" if echo_time is not None else ""]))
        return text or "echo ?", f"echo{number:g}" if number is not None else f"TE{echo_time:g}"
    if dimension == "b-value":
        return f"b = {value:g} s/mm2", f"b{value:g}"
    if dimension == "temporal position":
        return f"temporal position {value:g}", f"t{value:g}"
    return f"acquisition {value:g}", f"acq{value:g}"


def split_series(frames: Sequence[Frame], image_type: Sequence[str] = ()) -> list[tuple[str, str, Stack | str]]:
    """The series as (label, case-id suffix, Stack or reason) parts: one part when its frames form
    one regular stack; else one per combination of the interleaved dimensions (echo, b-value,
    temporal position, acquisition) that vary in it, where each value holds more than one frame."""
    try:
        return [("", "", regular_stack(frames, image_type))]
    except Rejected as whole:
        reason = str(whole)
    forming = []
    for d in range(len(SPLIT_DIMENSIONS)):
        groups: dict = {}
        for frame in frames:
            groups.setdefault(frame.split[d], []).append(frame)
        if len(groups) > 1 and all(len(g) > 1 for g in groups.values()):
            forming.append(d)
    if not forming:
        return [("", "", reason)]
    parts: dict = {}
    for frame in frames:
        parts.setdefault(tuple(frame.split[d] for d in forming), []).append(frame)
    result = []
    for key in sorted(parts, key=lambda k: tuple(_sortable(v) for v in k)):
        labels = [_part_label(SPLIT_DIMENSIONS[d], value) for d, value in zip(forming, key)]
        label, suffix = ", ".join(text for text, _ in labels), "_".join(s for _, s in labels)
        try:
            result.append((label, suffix, regular_stack(parts[key], image_type)))
        except Rejected as error:
            result.append((label, suffix, str(error)))
    return result


def _sortable(value):
    if isinstance(value, tuple):
        return tuple(_sortable(v) for v in value)
    return (value is None, value if value is not None else 0)


# ----------------------------------------------------------------------------- the folder

def scan_series(folder: str | Path, modalities: Iterable[str] = ("MR",)) -> SeriesScan:
    """Every image series under ``folder``: the regular stacks of an accepted modality as
    DicomSeries (named as ``with_case_ids`` says), the rest as SkippedSeries with their reasons.

    ``modalities``: the Modality values to predict (the model's, plus any the user allows); other
    image series are skipped with the reason. Objects that are not volume images (RT Structure
    Sets, Segmentations, reports, screenshots, DICOMDIR) are skipped with their SOP class.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    modalities = {m.upper() for m in modalities}
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: list[SkippedSeries] = []
    others: dict[tuple[str, str], list[Path]] = {}  # (series, SOP class) of non-image objects
    seen: dict[str, Path] = {}  # SOPInstanceUID: the file read first
    duplicates: dict[str, list[tuple[Path, Path]]] = {}
    for path in candidate_files(folder):
        header = read_header(path)
        if header is None or "SOPClassUID" not in header:
            continue
        sop_class = UID(header.SOPClassUID)
        if sop_class not in VOLUME_IMAGE_CLASSES:
            others.setdefault((describe(header), sop_class.name), []).append(path)
            continue
        if "SeriesInstanceUID" not in header:
            skipped.append(SkippedSeries(path.parent, path.name, "an image without SeriesInstanceUID", 1))
            continue
        uid = str(header.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            duplicates.setdefault(str(header.SeriesInstanceUID), []).append((path, seen[uid]))
            continue
        seen[uid] = path
        by_series.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    for (series, sop_class), paths in others.items():
        skipped.append(SkippedSeries(_home(paths), series, f"{sop_class}, not a volume image", len(paths)))
    for series_uid, pairs in duplicates.items():
        first = pairs[0]
        skipped.append(SkippedSeries(_home([p for p, _ in pairs]), describe(read_header(first[0])),
                                     f"{len(pairs)} file(s) repeat instances already read (same SOPInstanceUID, "
                                     f"e.g. {first[0].name} = {first[1]}): not a case of their own", len(pairs)))

    usable = []
    for series_uid, pairs in by_series.items():
        header = pairs[0][1]
        home = _home([p for p, _ in pairs])
        name = describe(header)
        modality = str(header.get("Modality", "")).upper()
        if modality not in modalities:
            allowed = " or ".join(sorted(modalities))
            skipped.append(SkippedSeries(home, name, f"modality {modality or 'unknown'}: the model reads {allowed} "
                                         f"(--allow-modality {modality or 'OT'} predicts it anyway)", len(pairs)))
            continue
        photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if int(header.get("SamplesPerPixel", 1) or 1) != 1 or not photometric.startswith("MONOCHROME"):
            skipped.append(SkippedSeries(home, name, f"{photometric} colour images, not greyscale", len(pairs)))
            continue
        frames = [frame for path, h in pairs for frame in frames_of(path, h)]
        image_type = [str(v) for v in (header.get("ImageType") or [])]
        frame_uids = {str(h.get("FrameOfReferenceUID", "")) for _, h in pairs}
        for label, suffix, stack in split_series(frames, image_type):
            part_name = f"{name}, {label}" if label else name
            if isinstance(stack, str):
                skipped.append(SkippedSeries(home, part_name, stack, len(pairs)))
                continue
            if len(frame_uids) > 1:
                skipped.append(SkippedSeries(home, part_name, f"slices have {len(frame_uids)} different "
                                             "FrameOfReferenceUIDs", len(pairs)))
                continue
            usable.append(series_from_stack(home, header, stack, next(iter(frame_uids)), label, suffix))
    usable.sort(key=lambda s: (s.patient_id, s.study_uid, s.series_number or 0, s.series_uid, s.part))
    skipped.sort(key=lambda s: (str(s.folder), s.series))
    return SeriesScan(folder, with_case_ids(folder, usable), skipped)


def _home(paths: Sequence[Path]) -> Path:
    """The folder that holds these files (their deepest common folder)."""
    parents = {Path(p).parent for p in paths}
    return parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(p) for p in parents]))


def series_from_stack(home: Path, header: Dataset, stack: Stack, frame_of_reference_uid: str, part: str,
                      suffix: str) -> DicomSeries:
    frames = stack.frames
    number = header.get("SeriesNumber")
    return DicomSeries(
        folder=home,
        series_uid=str(header.SeriesInstanceUID),
        study_uid=str(header.get("StudyInstanceUID", "")),
        frame_of_reference_uid=frame_of_reference_uid,
        case_id=suffix,  # the suffix until with_case_ids names the case
        sop_class_uid=str(header.SOPClassUID),
        files=tuple(frame.path for frame in frames),
        sop_instance_uids=tuple(frame.sop_instance_uid for frame in frames),
        shape=(frames[0].columns, frames[0].rows, len(frames)),
        affine=stack.affine,
        patient_id=str(header.get("PatientID", "")),
        series_number=int(number) if number not in (None, "") else None,
        series_description=str(header.get("SeriesDescription", "")),
        modality=str(header.get("Modality", "")),
        part=part,
        frame_numbers=tuple(frame.number for frame in frames),
        positions=stack.positions,
        orientation=stack.orientation,
        pixel_spacing=stack.pixel_spacing,
        rescale=tuple((frame.slope, frame.intercept) for frame in frames),
    )


def with_case_ids(folder: Path, series: list[DicomSeries]) -> list[DicomSeries]:
    """Name each case: the name of the folder holding its series where that folder holds no other
    series (one series per subfolder, as exports lay them out; or a lone series), else patient,
    series number and UID tail. A series split into parts adds the part (``_echo2``, ``_b800``);
    a name two cases would still share gets ``_2``, ``_3``, ... in scan order."""
    root = folder.resolve()
    uids_in: dict[Path, set[str]] = {}
    for item in series:
        uids_in.setdefault(item.folder.resolve(), set()).add(item.series_uid)
    several = len({item.series_uid for item in series}) > 1
    named, taken = [], set()
    for item in series:
        home = item.folder.resolve()
        if len(uids_in[home]) == 1 and not (several and home == root):
            base = safe_id(item.folder.resolve().name)
        else:
            digits = item.series_uid.replace(".", "")
            base = safe_id(f"{item.patient_id or 'series'}_{item.series_number or 0}_{digits[-8:]}")
        if item.case_id:  # the part's suffix
            base = f"{base}_{item.case_id}"
        case_id, copy = base, 2
        while case_id in taken:
            case_id, copy = f"{base}_{copy}", copy + 1
        taken.add(case_id)
        named.append(replace(item, case_id=case_id))
    return named


# ----------------------------------------------------------------------------- choosing and checking

def select_series(scan: SeriesScan, patterns: Sequence[str] | None) -> SeriesScan:
    """Keep the series that ``--series`` names, by SeriesInstanceUID, SeriesNumber or a
    SeriesDescription pattern (shell wildcards, case-insensitive); the others are skipped with
    that reason. A pattern that matches no series is an error that lists the series found."""
    if not patterns:
        return scan

    def matches(item: DicomSeries, pattern: str) -> bool:
        return (pattern == item.series_uid or (pattern.isdigit() and item.series_number == int(pattern))
                or fnmatch.fnmatch(item.series_description.lower(), pattern.lower()))

    unmatched = [p for p in patterns if not any(matches(item, p) for item in scan.usable)]
    if unmatched:
        found = "; ".join(item.describe() for item in scan.usable) or "none"
        raise DataError(f"{scan.folder}: --series {' '.join(unmatched)} matches no usable series (usable: {found})")
    kept = [item for item in scan.usable if any(matches(item, p) for p in patterns)]
    left = [SkippedSeries(item.folder, item.describe(), f"not selected by --series {' '.join(patterns)}",
                          len(set(item.files))) for item in scan.usable if item not in kept]
    return SeriesScan(scan.folder, kept, scan.skipped + left)


OUTPUT_REQUIREMENTS = {  # what each DICOM output must copy from the series it refers to
    "rtstruct": ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
    "seg": ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def check_output_requirements(series: Sequence[DicomSeries], formats: Sequence[str]) -> None:
    """Before anything is predicted: every series has what each requested DICOM output must
    refer to; raises DataError naming the first series that lacks something."""
    for item in series:
        values = {"FrameOfReferenceUID": item.frame_of_reference_uid, "StudyInstanceUID": item.study_uid,
                  "SeriesInstanceUID": item.series_uid,
                  "SOPInstanceUID": all(item.sop_instance_uids) and bool(item.sop_instance_uids)}
        for output in formats:
            missing = [k for k in OUTPUT_REQUIREMENTS.get(output, ()) if not values[k]]
            if missing:
                raise DataError(f"{item.where()}: --output-format {output} needs {', '.join(missing)}, which the "
                                "series lacks (an anonymiser may have removed it); nothing was written")


def find_series(folder: str | Path, modalities: Iterable[str] = ("MR",)) -> list[DicomSeries]:
    """The usable series under ``folder`` (``scan_series``); DataError when there is none, with
    every series' reason on one line."""
    scan = scan_series(folder, modalities)
    if not scan.usable:
        raise scan.nothing_usable()
    return scan.usable
