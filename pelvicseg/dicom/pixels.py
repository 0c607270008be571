"""Pixel data of a DICOM series onto the NIfTI grid the rest of the project uses.

    volume, affine = load_series(series)          # (column i, row j, slice k), RAS affine
    series_to_nifti(series, "out/case.nii.gz")

Compressed transfer syntaxes are decoded by pydicom's plugins: pylibjpeg with pylibjpeg-libjpeg
(JPEG Baseline, Extended 12-bit, Lossless, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000, HTJ2K),
pylibjpeg-rle or pydicom's own decoder (RLE Lossless), as pinned in requirements.txt. A file that
cannot be decoded is one line naming it: pydicom logs each plugin's traceback at ERROR level
before it raises, which would bury that line, so its logger is held back while decoding unless
the run asked for --debug.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.uid import UID

from pelvicseg.atomic import atomic_path
from pelvicseg.errors import DataError
from pelvicseg.dicom.series import DicomSeries, read_dicom

log = logging.getLogger("hipmri")


@contextlib.contextmanager
def quiet_decoders():
    """pydicom's tracebacks of failed decoder plugins kept off stderr (the error says it all),
    unless the project's logger is at DEBUG (cli.py's --debug)."""
    pydicom_log = logging.getLogger("pydicom")
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    before = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        pydicom_log.setLevel(before)


def decode_error_text(error: Exception) -> str:
    """The decoders' own words on one line: pydicom lists each plugin's failure on its own line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Unable to decode as exceptions were raised by all available plugins"):
        lines = lines[1:]
    return "; ".join(lines) or type(error).__name__


def read_pixels(path: Path) -> tuple[np.ndarray, str]:
    """(stored pixel values, (frames, rows, columns) for multi-frame files, else (rows, columns);
    transfer syntax name) of one file; DataError naming the file when its pixel data cannot be
    decoded."""
    dataset = read_dicom(path)
    syntax = UID(dataset.file_meta.TransferSyntaxUID).name
    try:
        with quiet_decoders():
            return dataset.pixel_array, syntax
    except Exception as error:  # each decoder plugin raises its own kinds; all mean the same here
        raise DataError(f"{path}: pixel data ({syntax}) cannot be decoded: {decode_error_text(error)}") from None


def load_series(series: DicomSeries) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 with axes (column i, row j, slice k), 4x4 RAS affine) of ``series``.

    Rescale slope and intercept apply per slice (per frame for multi-frame images).
    ``nib.Nifti1Image(volume, affine)`` puts every voxel where the DICOM pixel is.
    """
    columns, rows, _ = series.shape
    volume = np.empty(series.shape, dtype=np.float32)
    frame_numbers = series.frame_numbers or (None,) * len(series.files)
    rescale = series.rescale or ((1.0, 0.0),) * len(series.files)
    cache: dict[Path, np.ndarray] = {}  # a multi-frame file is decoded once for all its frames
    for k, (path, number) in enumerate(zip(series.files, frame_numbers)):
        if path not in cache:
            cache = {path: read_pixels(path)[0]}
        pixels = cache[path]
        if number is not None:
            if pixels.ndim == 2 and number == 1:
                pixels = pixels[None]
            if pixels.ndim != 3 or number > pixels.shape[0]:
                raise DataError(f"{path}: pixel data of shape {pixels.shape} holds no frame {number}")
            pixels = pixels[number - 1]
        if pixels.shape != (rows, columns):
            raise DataError(f"{path}: pixel data of shape {pixels.shape}, expected {(rows, columns)} "
                            "(greyscale, one sample per pixel)")
        slope, intercept = rescale[k]
        volume[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return volume, series.affine.copy()


def series_to_nifti(series: DicomSeries, path: str | Path) -> Path:
    """Write ``series`` as NIfTI (q/s-form code 1, scanner coordinates) and return the path."""
    volume, affine = load_series(series)
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path
