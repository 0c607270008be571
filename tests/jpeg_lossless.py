"""A minimal JPEG Lossless encoder (ITU-T T.81 process 14, selection value 1), for tests.

No package that requirements.txt installs encodes JPEG Lossless: pydicom has no encoder for it
and pylibjpeg-libjpeg only decodes. Scanners write it often, so the tests make their own streams
here, independently of the reader under test, and libjpeg decodes them. dcmtk's ``dcmdjpeg``
decodes files made with it to the same pixels (checked by hand; see the README).

One component, 16-bit precision, predictor 1 (the pixel to the left; the first row predicts from
the left, the first column from above, the first pixel from 2^15), one Huffman table with all 17
difference categories at code length 5.
"""

from __future__ import annotations

import struct

import numpy as np

PRECISION = 16
HUFFMAN_LENGTH = 5  # 17 categories fit in 5-bit codes, none of them all ones


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def encode(image: np.ndarray) -> bytes:
    """One JPEG Lossless SV1 stream of a 2D uint16 image (rows, columns)."""
    image = np.asarray(image, dtype=np.int64)
    rows, columns = image.shape
    prediction = np.empty_like(image)
    prediction[0, 0] = 1 << (PRECISION - 1)
    prediction[0, 1:] = image[0, :-1]
    prediction[1:, 0] = image[:-1, 0]
    prediction[1:, 1:] = image[1:, :-1]
    difference = (image - prediction) % (1 << PRECISION)
    difference = np.where(difference >= 1 << (PRECISION - 1), difference - (1 << PRECISION), difference)

    bits = []
    for value in difference.ravel().tolist():
        category = 16 if value == -(1 << 15) else abs(value).bit_length()
        bits.append(format(category, f"0{HUFFMAN_LENGTH}b"))  # canonical codes: category c is code c
        if 0 < category < 16:
            extra = value if value > 0 else (value - 1) & ((1 << category) - 1)
            bits.append(format(extra, f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # padding with one bits, as T.81 F.1.2.3 says
    data = bytearray()
    for start in range(0, len(stream), 8):
        byte = int(stream[start:start + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing

    counts = [0] * 16
    counts[HUFFMAN_LENGTH - 1] = 17
    frame = struct.pack(">BHHB", PRECISION, rows, columns, 1) + bytes([1, 0x11, 0])
    table = bytes([0x00]) + bytes(counts) + bytes(range(17))
    scan = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, point transform 0
    return (b"\xff\xd8" + _segment(0xFFC3, frame) + _segment(0xFFC4, table) + _segment(0xFFDA, scan)
            + bytes(data) + b"\xff\xd9")
