"""Series that a scanner or PACS puts beside the T2, made from a single-frame series for tests,
and a second RTSTRUCT reader.

Each function reads the files of a series written by ``phantom.write_dicom_series`` and writes a
variant into ``folder``: a multi-frame copy made by highdicom's legacy converter, a JPEG Lossless
re-encoding (tests/jpeg_lossless.py, decoded by libjpeg), RLE and JPEG 2000 re-encodings made by
pydicom's own encoders, a three-plane localizer, a CT, a dual-echo series, a plain copy. Every
variant but the copy gets new Series and SOP Instance UIDs, as a scanner's would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, JPEGLosslessSV1, generate_uid

import jpeg_lossless
from matplotlib.path import Path as MatplotlibPath


def _renewed(path, series_uid: str) -> pydicom.Dataset:
    dataset = pydicom.dcmread(path)
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset


def _save(dataset: pydicom.Dataset, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dataset.save_as(folder / name, enforce_file_format=True)
    return folder / name


def copy(files, folder) -> list[Path]:
    """The same files (same UIDs) in another folder, as a second export of one series gives."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / Path(f).name)) for f in files]


def enhanced(files, folder, series_number: int = 11) -> Path:
    """One Legacy Converted Enhanced MR file holding every slice as a frame (highdicom)."""
    datasets = [pydicom.dcmread(f) for f in files]
    for dataset in datasets:  # the converter wants a window; the phantom writes none
        dataset.WindowCenter, dataset.WindowWidth = 2000, 4000
    image = hd.legacy.LegacyConvertedEnhancedMRImage(datasets, generate_uid(), series_number, generate_uid(), 1)
    image.SeriesDescription = "T2 enhanced"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image.save_as(folder / "enhanced.dcm")
    return folder / "enhanced.dcm"


def jpeg_lossless_copy(files, folder, series_number: int = 12) -> list[Path]:
    """Every slice re-encoded as JPEG Lossless, first-order prediction (transfer syntax .70)."""
    uid, written = generate_uid(), []
    for path in files:
        dataset = _renewed(path, uid)
        dataset.PixelData = encapsulate([jpeg_lossless.encode(dataset.pixel_array)])
        dataset["PixelData"].VR = "OB"
        dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        dataset.SeriesNumber, dataset.SeriesDescription = series_number, "T2 JPEG Lossless"
        written.append(_save(dataset, Path(folder), Path(path).name))
    return written


def compressed_copy(files, folder, transfer_syntax) -> list[Path]:
    """Every slice re-encoded by pydicom's encoder for ``transfer_syntax`` (RLE: pydicom's own;
    JPEG 2000: pylibjpeg-openjpeg)."""
    uid, written = generate_uid(), []
    for path in files:
        dataset = _renewed(path, uid)
        dataset.compress(transfer_syntax)
        written.append(_save(dataset, Path(folder), Path(path).name))
    return written


def localizer(files, folder, series_number: int = 13) -> list[Path]:
    """Three slices in three planes, as a scanner's three-plane localizer."""
    uid, written = generate_uid(), []
    planes = ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])  # axial, coronal, sagittal
    for k, orientation in enumerate(planes):
        dataset = _renewed(files[len(files) // 2], uid)
        dataset.ImageOrientationPatient = orientation
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        dataset.SeriesNumber, dataset.SeriesDescription, dataset.InstanceNumber = series_number, "3-plane loc", k + 1
        written.append(_save(dataset, Path(folder), f"LOC{k + 1}.dcm"))
    return written


def ct(files, folder, series_number: int = 14) -> list[Path]:
    """The same grid stored as CT images (a planning CT's place in the study)."""
    uid, written = generate_uid(), []
    for path in files:
        dataset = _renewed(path, uid)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
        dataset.Modality, dataset.SeriesNumber, dataset.SeriesDescription = "CT", series_number, "planning CT"
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
        written.append(_save(dataset, Path(folder), "CT" + Path(path).name[2:]))
    return written


def dual_echo(files, folder, series_number: int = 15) -> list[Path]:
    """Two echoes interleaved in one series: each position twice, EchoNumbers 1 (TE 20 ms) and
    2 (TE 90 ms, half the signal)."""
    uid, written = generate_uid(), []
    for path in files:
        for echo, echo_time, scale in ((1, 20, 1.0), (2, 90, 0.5)):
            dataset = _renewed(path, uid)
            dataset.EchoNumbers, dataset.EchoTime = echo, echo_time
            pixels = np.rint(dataset.pixel_array * scale).astype(np.uint16)
            dataset.PixelData = pixels.tobytes()
            dataset.SeriesNumber, dataset.SeriesDescription = series_number, "dual echo"
            written.append(_save(dataset, Path(folder), f"E{echo}_{Path(path).name}"))
    return written


def union_reader_masks(path, series):
    """ROI masks as a reader that fills every contour and takes their union reads them (some
    planning systems do): matplotlib's point-in-polygon on each pixel centre, not shared with the
    project's even-odd reader; contour points mapped into the slice by its own header's position
    and orientation (single-frame series)."""
    ds = pydicom.dcmread(path)
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    headers = {}
    for k, file in enumerate(series.files):
        header = pydicom.dcmread(file, stop_before_pixels=True)
        headers[header.SOPInstanceUID] = (k, header)
    columns, rows, _ = series.shape
    centres = np.column_stack([a.ravel() for a in np.meshgrid(np.arange(columns), np.arange(rows), indexing="ij")])
    masks = {}
    for roi_contour in ds.ROIContourSequence:
        mask = np.zeros(series.shape, dtype=bool)
        for contour in roi_contour.ContourSequence:
            k, header = headers[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            cosines = np.array(header.ImageOrientationPatient, dtype=float)
            spacing = np.array(header.PixelSpacing, dtype=float)
            offsets = np.array(contour.ContourData, dtype=float).reshape(-1, 3) - np.array(
                header.ImagePositionPatient, dtype=float)
            polygon = np.column_stack([offsets @ cosines[:3] / spacing[1], offsets @ cosines[3:] / spacing[0]])
            mask[:, :, k] |= MatplotlibPath(polygon).contains_points(centres).reshape(columns, rows)
        masks[names[int(roi_contour.ReferencedROINumber)]] = mask
    return masks
