"""DICOM out: labels on a series' grid as an RT Structure Set (RTSTRUCT) and a DICOM Segmentation
(SEG), both referring to the series they were drawn on; and an RTSTRUCT read back as masks.

    write_rtstruct(labels, series, CLASS_NAMES, "out/case_rtstruct.dcm")
    write_seg(labels, series, CLASS_NAMES, "out/case_seg.dcm")

Finding and reading the series is dicom_series.py's job (which series, the grid) and
dicom_pixels.py's (the voxels); their names are re-exported here for older callers.

RTSTRUCT is written with pydicom, not rt-utils. rt-utils 1.2.7 fails in three ways that matter
here: Contour Data decimal strings longer than DICOM's 16 characters (over 40,000 dciodvfy
errors on one case), no top-level FrameOfReferenceUID, and polygons through the centres of the
boundary pixels, so a planning system that fills the pixels whose centres lie inside loses about
half of the boundary (Dice 0.69 for the rectum at 3.7 mm). The polygons here follow the 0.5
iso-line of the mask (marching squares via contourpy), which contains the centre of every
labelled pixel and of no other.

Holes. Planning systems disagree on contours nested on one slice: some combine them by the
even-odd rule (an inner contour is a hole), others fill every contour and take the union (an
inner contour is swallowed). An organ's hole is therefore written as a keyhole: one polygon per
connected piece, its holes joined to its outline by zero-width cuts, so that both kinds of reader
fill exactly the organ's pixels, and the NIfTI, SEG and RTSTRUCT keep the same organ. Filling the
holes instead would be wrong for the bone class, whose pelvic ring encloses the bladder and
prostate on axial slices. The cuts run at a quarter-pixel height between pixel rows, so no pixel
centre lies on one. The body (EXTERNAL) is the patient's outline: one outer contour per
connected piece of each slice with everything inside, since a dose engine treats anything
outside the EXTERNAL as air.

Geometry: DICOM patient coordinates are LPS, NIfTI's (as nibabel writes them) are RAS, so
world_RAS = diag(-1, -1, 1) @ world_LPS.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

import contourpy
import highdicom as hd
import matplotlib.colors
import numpy as np
import pydicom
from matplotlib.path import Path as Polygon
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ImplicitVRLittleEndian, generate_uid
from scipy import ndimage

from pelvicseg.atomic import atomic_path
from pelvicseg.errors import DataError
from pelvicseg.dicom.pixels import load_series, series_to_nifti
from pelvicseg.dicom.series import (LPS_TO_RAS, DicomSeries, describe, find_series, is_dicom_folder, read_dicom, read_header,
                          scan_series)
from pelvicseg.palette import class_colours

__all__ = [  # the writers, and the reading side's names for callers of the single-module API
    "write_rtstruct", "write_seg", "read_rtstruct_masks", "mask_polygons", "roi_name", "parse_roi_names",
    "absent_classes", "TG263_NAMES", "DicomSeries", "describe", "find_series", "is_dicom_folder", "load_series",
    "read_dicom", "read_header", "scan_series", "series_to_nifti"]

RTSTRUCT_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.481.3")
# Detached Study Management: the class every RTSTRUCT writer puts in RTReferencedStudySequence
STUDY_REFERENCE_SOP_CLASS = UID("1.2.840.10008.3.1.2.3.1")
# high numbers put the outputs after the scanner's own series in a planning system's list
RTSTRUCT_SERIES_NUMBER = 901
SEG_SERIES_NUMBER = 902
SOFTWARE = "hipmri-unet"
CONTOUR_DECIMALS = 3  # micrometres: far below any voxel, and every value fits 16 characters
SEGMENT_TYPES = {  # SNOMED CT codes of HipMRI's classes; other names get the generic "Tissue"
    "body": codes.SCT.EntireBody,
    "bone": codes.SCT.Bone,
    "bladder": codes.SCT.Bladder,
    "rectum": codes.SCT.Rectum,
    "prostate": codes.SCT.Prostate,
}
# AAPM TG-263 structure names. HipMRI's bone class covers the pelvic bones and the proximal
# femurs, so TG-263's generic "Bone" fits it and the narrower "Bone_Pelvic" would not.
TG263_NAMES = {"body": "External", "bone": "Bone", "bladder": "Bladder", "rectum": "Rectum",
               "prostate": "Prostate"}


def roi_name(class_name: str, roi_names: Mapping[str, str] | None = None) -> str:
    """The ROI (and segment) name of a class: ``roi_names`` first, then TG-263, else the class name."""
    if roi_names and class_name in roi_names:
        return roi_names[class_name]
    return TG263_NAMES.get(class_name.lower(), class_name)


def parse_roi_names(items: Sequence[str] | None, class_names: Sequence[str]) -> dict[str, str]:
    """``["body=External", "bone=Bone_Pelvic"]`` as {class: ROI name}; DataError for another form,
    an unknown class, or two classes given one name."""
    names = {}
    for item in items or ():
        class_name, sep, name = item.partition("=")
        if not sep or not class_name.strip() or not name.strip():
            raise DataError(f"--roi-names {item}: expected CLASS=NAME, e.g. bone=Bone_Pelvic")
        if class_name.strip() not in class_names[1:]:
            raise DataError(f"--roi-names {item}: no class {class_name.strip()!r} (classes: "
                            f"{', '.join(class_names[1:])})")
        if len(name.strip()) > 64:
            raise DataError(f"--roi-names {item}: a DICOM ROI name holds at most 64 characters")
        names[class_name.strip()] = name.strip()
    final = [roi_name(c, names) for c in class_names[1:]]
    repeated = sorted({n for n in final if final.count(n) > 1})
    if repeated:
        raise DataError(f"--roi-names: two classes would share the ROI name {repeated[0]}")
    return names


def absent_classes(labels: np.ndarray, class_names: Sequence[str], external_class: str | None = "body") -> list[str]:
    """The ROIs left out of the RTSTRUCT: foreground classes without a single voxel, and the
    external class only when nothing at all is labelled (it outlines every labelled voxel)."""
    present = np.bincount(np.asarray(labels).reshape(-1).astype(np.int64), minlength=len(class_names))
    return [name for number, name in enumerate(class_names) if number > 0
            and not (present[1:].any() if name == external_class else present[number])]


# ----------------------------------------------------------------------------- polygons

def _ring(points: np.ndarray) -> np.ndarray:
    """A closed ring without its repeated end point and without points on straight runs."""
    points = points[:-1] if len(points) > 1 and np.array_equal(points[0], points[-1]) else points
    before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
    return points[turns]


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def filled_polygons(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """(outline, holes) per connected piece of a 2D mask, in index coordinates (i, j), along the
    0.5 iso-line: outlines counter-clockwise, holes clockwise. The mask is zero-padded so that
    pieces touching the image edge close too; an island inside a hole is a piece of its own."""
    padded = np.pad(mask.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, fill_type=contourpy.FillType.OuterOffset)
    pieces = []
    for points, offsets in zip(*generator.filled(0.5, 2.0)):
        # contourpy's (x, y) is (j, i), and the padding shifted both by one
        rings = [_ring(points[a:b, ::-1] - 1) for a, b in zip(offsets[:-1], offsets[1:])]
        outline, holes = rings[0], rings[1:]
        outline = outline if _area(outline) > 0 else outline[::-1]
        pieces.append((outline, [h if _area(h) < 0 else h[::-1] for h in holes]))
    return pieces


def _crossings(ring: np.ndarray, y: float) -> list[tuple[float, int]]:
    """(x, edge index) where the horizontal line at ``y`` crosses the ring's edges (never at a
    vertex: callers choose a ``y`` no vertex has)."""
    a, b = ring, np.roll(ring, -1, axis=0)
    crossing = (a[:, 1] - y) * (b[:, 1] - y) < 0
    edges = np.flatnonzero(crossing)
    x = a[edges, 0] + (y - a[edges, 1]) * (b[edges, 0] - a[edges, 0]) / (b[edges, 1] - a[edges, 1])
    return list(zip(x.tolist(), edges.tolist()))


def _joined(target: np.ndarray, edge: int, at: np.ndarray, hole: np.ndarray, hole_edge: int,
            start: np.ndarray) -> np.ndarray:
    """``target`` with ``hole`` spliced in by a zero-width cut from ``at`` (on the target's
    ``edge``) to ``start`` (on the hole's ``hole_edge``) and back."""
    around = np.concatenate([hole[hole_edge + 1:], hole[:hole_edge + 1]])
    return np.concatenate([target[:edge + 1], [at, start], around, [start, at], target[edge + 1:]])


def keyhole_polygon(outline: np.ndarray, holes: Sequence[np.ndarray]) -> np.ndarray:
    """One polygon whose interior is the outline's less its holes: each hole is cut open towards
    the right (+i) to the nearest boundary, the outline or another hole, until one ring is left.

    The cuts are horizontal lines at heights ``k + 0.05 .. k + 0.45`` (one height per cut), so
    they meet no vertex (all at multiples of 0.5), no pixel centre (whole numbers) and no other
    cut; a cut starts at a hole's rightmost crossing, so it runs through the organ only.
    """
    ring, pending = outline, [h for h in holes]
    cut = 0
    while pending:
        hole = pending.pop(0)
        cut += 1
        y = float(hole[:, 1].min()) + 0.05 + 0.4 * ((cut * 0.6180339887498949) % 1.0)
        start_x, hole_edge = max(_crossings(hole, y))
        start = np.array([start_x, y])
        best = None  # (x, which ring: -1 the outline, else an index in pending, edge)
        for owner, candidate in [(-1, ring)] + list(enumerate(pending)):
            for x, edge in _crossings(candidate, y):
                if x > start_x and (best is None or x < best[0]):
                    best = (x, owner, edge)
        x, owner, edge = best
        at = np.array([x, y])
        if owner == -1:
            ring = _joined(ring, edge, at, hole, hole_edge, start)
        else:
            pending[owner] = _joined(pending[owner], edge, at, hole, hole_edge, start)
    return ring


def mask_polygons(mask: np.ndarray, outline_only: bool = False) -> list[np.ndarray]:
    """Closed polygons (N, 2) in index coordinates (i, j) that fill exactly the pixels of a 2D
    mask whether a reader combines them by the even-odd rule or by their union: one per connected
    piece, holes joined by keyhole cuts. ``outline_only``: the pieces' outlines, holes filled."""
    if outline_only:
        mask = ndimage.binary_fill_holes(mask)
        return [outline for outline, _ in filled_polygons(mask)]
    return [keyhole_polygon(outline, holes) for outline, holes in filled_polygons(mask)]


def ds_strings(values: np.ndarray) -> list[str]:
    """Decimal strings of at most 16 characters (DICOM's limit for DS), rounded to micrometres."""
    rounded = np.round(np.asarray(values, dtype=np.float64), CONTOUR_DECIMALS) + 0.0  # + 0.0: no "-0.000"
    return [f"{v:.{CONTOUR_DECIMALS}f}" for v in rounded]


def rgb255(colour) -> list[int]:
    return [int(round(255 * c)) for c in matplotlib.colors.to_rgb(colour)]


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Patient and study attributes of the source series, so the output files under it."""
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber", "StudyDescription"):
        if keyword in source:
            setattr(target, keyword, source[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # type 2: present, maybe empty
        if keyword not in target:
            setattr(target, keyword, "")


def image_reference(series: DicomSeries, k: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = series.sop_class_uid
    item.ReferencedSOPInstanceUID = series.sop_instance_uids[k]
    number = series.frame_numbers[k] if series.frame_numbers else None
    if number is not None:  # a frame of a multi-frame image
        item.ReferencedFrameNumber = number
    return item


# ----------------------------------------------------------------------------- writing RTSTRUCT

def write_rtstruct(labels: np.ndarray, series: DicomSeries, class_names: Sequence[str], path: str | Path,
                   colours: Sequence | None = None, external_class: str | None = "body",
                   structure_set_label: str = "UNet", roi_names: Mapping[str, str] | None = None) -> Path:
    """Write ``labels`` (integers on the ``load_series`` grid) as an RT Structure Set for ``series``.

    One ROI per class that has voxels, except background (class 0), numbered as its class,
    named by ``roi_name`` (TG-263 unless ``roi_names`` says otherwise) and coloured like the
    figures (``palette.class_colours``) unless ``colours`` (any matplotlib colours, one per
    class) is given; a class without voxels is left out (``absent_classes``). Contours are closed
    planar polygons in patient coordinates (mm) on the image slices, holes as keyholes
    (``mask_polygons``).

    The ``external_class`` ROI (default "body", interpreted type EXTERNAL) is the patient's
    outline: per slice, the outer contour of every labelled voxel, organs and bones included,
    with nothing cut out. The SEG keeps the body label exactly.
    """
    labels = np.asarray(labels)
    if labels.shape != series.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the series grid {series.shape}")
    if not series.frame_of_reference_uid:
        raise DataError(f"{series.where()}: the series has no FrameOfReferenceUID, so no RTSTRUCT can refer to it")
    colours = list(colours) if colours is not None else class_colours(len(class_names))
    source = read_dicom(series.files[0], pixels=False)
    lps = LPS_TO_RAS @ series.affine
    now = datetime.datetime.now()

    ds = Dataset()
    copy_patient_and_study(source, ds)
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = f"{structure_set_label} contours"
    ds.OperatorsName = ""
    ds.Manufacturer = SOFTWARE
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.InstanceNumber = 1
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = DicomSequence(
        [image_reference(series, k) for k in range(len(series.sop_instance_uids))])
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = STUDY_REFERENCE_SOP_CLASS
    referenced_study.ReferencedSOPInstanceUID = series.study_uid
    referenced_study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    frame_of_reference = Dataset()
    frame_of_reference.FrameOfReferenceUID = series.frame_of_reference_uid
    frame_of_reference.RTReferencedStudySequence = DicomSequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_of_reference])

    structure_rois, roi_contours, observations = [], [], []
    absent = set(absent_classes(labels, class_names, external_class))
    for number, name in enumerate(class_names):
        if number == 0 or name in absent:
            continue
        is_external = name == external_class
        mask = labels > 0 if is_external else labels == number
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        roi.ROIName = roi_name(name, roi_names)
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        structure_rois.append(roi)

        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = rgb255(colours[number])
        contours = []
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for polygon in mask_polygons(mask[:, :, k], outline_only=is_external):
                index = np.column_stack([polygon, np.full(len(polygon), k), np.ones(len(polygon))])
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([image_reference(series, int(k))])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(polygon)
                contour.ContourNumber = len(contours) + 1
                contour.ContourData = ds_strings((index @ lps.T)[:, :3].ravel())
                contours.append(contour)
        roi_contour.ContourSequence = DicomSequence(contours)
        roi_contours.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "EXTERNAL" if is_external else "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(structure_rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # implicit VR: its 4-byte lengths hold any Contour Data, where explicit VR's DS stops at 64 KiB
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = Path(path)
    with atomic_path(path) as temporary:
        ds.save_as(temporary, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- writing SEG

def write_seg(labels: np.ndarray, series: DicomSeries, class_names: Sequence[str], path: str | Path,
              colours: Sequence | None = None, algorithm_name: str = "3D Improved UNet",
              algorithm_version: str = "1", roi_names: Mapping[str, str] | None = None) -> Path:
    """Write ``labels`` as a binary DICOM Segmentation (highdicom) referencing ``series``.

    One segment per class except background, numbered as its class and labelled as the
    RTSTRUCT names its ROI, so the labels come back exactly (the body segment is the body label,
    not the outline that the RTSTRUCT's EXTERNAL ROI is). Frames without any voxel of a segment
    are left out, as highdicom does by default. For a multi-frame source the frames follow the
    source's own frame order.
    """
    labels = np.asarray(labels)
    if labels.shape != series.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the series grid {series.shape}")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels run from {labels.min()} to {labels.max()}, beyond the {len(class_names)} classes")
    colours = list(colours) if colours is not None else class_colours(len(class_names))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=roi_name(name, roi_names),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=SEGMENT_TYPES.get(name.lower(), codes.SCT.Tissue),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*rgb255(colours[number])),
        )
        for number, name in enumerate(class_names) if number > 0
    ]
    planes = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint16)  # (slice, row, column)
    if series.is_multiframe:
        source = read_dicom(series.files[0], pixels=False)
        sources = [source]
        pixel_array = np.zeros((int(source.NumberOfFrames), *planes.shape[1:]), dtype=np.uint16)
        pixel_array[np.array(series.frame_numbers) - 1] = planes  # frames of other parts stay empty
    else:
        sources = [read_dicom(p, pixels=False) for p in series.files]
        pixel_array = planes
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=f"{algorithm_name} segmentation",
    )
    path = Path(path)
    with atomic_path(path) as temporary:
        segmentation.save_as(temporary)
    return path


# ----------------------------------------------------------------------------- reading RTSTRUCT

def read_rtstruct_masks(path: str | Path, series: DicomSeries) -> dict[str, np.ndarray]:
    """ROI masks (bool, ``series.shape``) of an RT Structure Set, by ROI name.

    Read as a planning system does, independently of ``write_rtstruct``: each contour goes to
    the slice it references (or, without a reference, the nearest one), is mapped into that
    slice's pixel grid from the slice's own ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing, and fills the pixels whose centres lie inside; contours on one slice combine by
    the even-odd rule, so a contour inside another is a hole.
    """
    path = Path(path)
    ds = pydicom.dcmread(path)
    if ds.SOPClassUID != RTSTRUCT_SOP_CLASS:
        raise DataError(f"{path}: not an RT Structure Set ({UID(ds.SOPClassUID).name})")
    frames = {str(item.FrameOfReferenceUID) for item in ds.get("ReferencedFrameOfReferenceSequence", [])}
    if series.frame_of_reference_uid not in frames:
        raise DataError(f"{path}: refers to frame(s) of reference {sorted(frames)}, "
                        f"not the series' {series.frame_of_reference_uid}")
    cosines = np.array(series.orientation, dtype=float)
    row_cosine, column_cosine = cosines[:3], cosines[3:]
    normal = np.cross(row_cosine, column_cosine)
    row_spacing, column_spacing = series.pixel_spacing
    positions = np.asarray(series.positions, dtype=float)
    frame_numbers = series.frame_numbers or (None,) * len(series.sop_instance_uids)
    slice_of = {(uid, number): k for k, (uid, number) in enumerate(zip(series.sop_instance_uids, frame_numbers))}
    slice_spacing = np.linalg.norm(series.affine[:3, 2])  # a quarter of it tells a slice from its neighbour
    columns, rows, _ = series.shape
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    masks = {}
    for roi_contour in ds.get("ROIContourSequence", []):
        mask = np.zeros(series.shape, dtype=bool)
        for contour in roi_contour.get("ContourSequence", []):
            if contour.ContourGeometricType != "CLOSED_PLANAR":
                continue  # points and open lines enclose nothing
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            if "ContourImageSequence" in contour:
                reference = contour.ContourImageSequence[0]
                number = reference.get("ReferencedFrameNumber")
                key = (str(reference.ReferencedSOPInstanceUID), int(number) if number not in (None, "") else None)
                if key not in slice_of:
                    raise DataError(f"{path}: a contour references image {key[0]}"
                                    + (f" frame {key[1]}" if key[1] else "") + ", which is not in the series")
                k = slice_of[key]
            else:
                k = int(np.argmin(np.abs((points[0] - positions) @ normal)))
            offsets = points - positions[k]
            off_plane = np.abs(offsets @ normal).max()
            if off_plane > 0.25 * slice_spacing:
                raise DataError(f"{path}: ROI {names.get(int(roi_contour.ReferencedROINumber))}: a contour lies "
                                f"{off_plane:.2f} mm off the slice it references")
            polygon = np.column_stack([offsets @ row_cosine / column_spacing, offsets @ column_cosine / row_spacing])
            low = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, [columns - 1, rows - 1])
            high = np.clip(np.ceil(polygon.max(axis=0)).astype(int), 0, [columns - 1, rows - 1])
            i, j = np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1), indexing="ij")
            inside = Polygon(polygon).contains_points(np.column_stack([i.ravel(), j.ravel()])).reshape(i.shape)
            mask[low[0]:high[0] + 1, low[1]:high[1] + 1, k] ^= inside
        masks[names[int(roi_contour.ReferencedROINumber)]] = mask
    return masks
