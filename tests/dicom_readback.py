"""A second reader of predict.py's DICOM outputs, for tests: the SEG's pixels and the RTSTRUCT's
contours put back on the NIfTI grid of the prediction by geometry alone.

Nothing here comes from pelvicseg/dicom/: each SEG frame is placed by its own Plane Position and
Orientation and Pixel Spacing, each contour point by its patient coordinates, and both go through
the inverse of the NIfTI prediction's affine (DICOM patient coordinates are LPS, nibabel's are
RAS). A SEG written from labels flipped, transposed or shifted, or contours put in the wrong
place, therefore read back as other labels than the NIfTI's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from matplotlib.path import Path as MatplotlibPath

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
ON_GRID = 1e-3  # voxels: how far a frame's pixel or a contour's slice may lie from a voxel centre


def voxel_coordinates(points_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) DICOM patient coordinates (mm) -> (N, 3) voxel coordinates of the NIfTI ``affine``."""
    ras = np.asarray(points_lps, dtype=float).reshape(-1, 3) * LPS_TO_RAS
    return (np.column_stack([ras, np.ones(len(ras))]) @ np.linalg.inv(affine).T)[:, :3]


def _group(frame: pydicom.Dataset, shared: pydicom.Dataset, keyword: str) -> pydicom.Dataset:
    """A functional group of one frame: its own where it has one, else the shared one."""
    return (frame.get(keyword) or shared.get(keyword))[0]


def seg_labels(path: str | Path, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict]:
    """A binary DICOM-SEG as labels on the grid (``affine``, ``shape``): each voxel the number of the
    segment whose frame covers it (0 where none does), and {segment number: segment label}. Fails
    where a frame's pixel is off the grid or two segments claim one voxel."""
    ds = pydicom.dcmread(path)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    pixels = np.asarray(ds.pixel_array).reshape(int(ds.get("NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    labels = np.zeros(shape, dtype=np.int16)
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        cosines = np.array(_group(item, shared, "PlaneOrientationSequence").ImageOrientationPatient, dtype=float)
        row_spacing, column_spacing = map(float, _group(item, shared, "PixelMeasuresSequence").PixelSpacing)
        origin = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        rows, columns = np.nonzero(frame)
        # DICOM: a column index steps along the row direction cosine, a row index along the column one
        points = (origin + np.outer(columns * column_spacing, cosines[:3])
                  + np.outer(rows * row_spacing, cosines[3:]))
        voxels = voxel_coordinates(points, affine)
        index = np.rint(voxels).astype(int)
        assert np.abs(voxels - index).max(initial=0) < ON_GRID, f"{path}: a frame of segment {segment} is off the grid"
        assert ((index >= 0) & (index < np.array(shape))).all(), f"{path}: segment {segment} lies outside the grid"
        where = tuple(index.T)
        assert not labels[where].any(), f"{path}: segment {segment} overlaps another"
        labels[where] = segment
    return labels, names


def rtstruct_masks(path: str | Path, affine: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """An RT Structure Set's ROIs as masks on the grid (``affine``, ``shape``), by ROI name: each
    closed contour's points mapped to voxel coordinates, where they must lie on one slice of the
    third axis; the voxel centres inside its polygon filled, contours on a slice combined by the
    even-odd rule."""
    ds = pydicom.dcmread(path)
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.column_stack([i.ravel(), j.ravel()])
    masks = {}
    for roi_contour in ds.ROIContourSequence:
        name = names[int(roi_contour.ReferencedROINumber)]
        mask = np.zeros(shape, dtype=bool)
        for contour in roi_contour.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR", name
            voxels = voxel_coordinates(np.array(contour.ContourData, dtype=float), affine)
            k = int(np.rint(voxels[0, 2]))
            assert np.abs(voxels[:, 2] - k).max() < ON_GRID and 0 <= k < shape[2], f"{name}: a contour off the slices"
            inside = MatplotlibPath(voxels[:, :2]).contains_points(centres).reshape(shape[:2])
            mask[:, :, k] ^= inside
        masks[name] = mask
    return masks
