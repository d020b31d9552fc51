"""JPEG Lossless (process 14, selection value 1) DICOM series decode exactly.

No installed package encodes this syntax, so a minimal encoder (one component, predictor
1, a flat Huffman table) writes the frames; pydicom decodes them with pylibjpeg-libjpeg.
"""

import numpy as np
import pydicom
import pytest
from helpers import make_geometry, phantom, write_dicom_series
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from medseg.io import read_scan

PRECISION = 16


class _Bits:
    """An entropy-coded segment: bits packed MSB first, 0xFF bytes stuffed with 0x00."""

    def __init__(self) -> None:
        self.out, self.acc, self.count = bytearray(), 0, 0

    def put(self, value: int, length: int) -> None:
        for i in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.count += 1
            if self.count == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)
                self.acc = self.count = 0

    def close(self) -> bytes:
        if self.count:
            self.put((1 << (8 - self.count)) - 1, 8 - self.count)  # pad with 1-bits
        return bytes(self.out)


def _segment(marker: int, payload: bytes) -> bytes:
    return marker.to_bytes(2, "big") + (len(payload) + 2).to_bytes(2, "big") + payload


def _predicted(x: np.ndarray, r: int, c: int) -> int:
    """Selection value 1 (the sample to the left); the first column takes the one above,
    the very first sample the middle of the range."""
    if r == 0 and c == 0:
        return 1 << (PRECISION - 1)
    return int(x[r - 1, c] if c == 0 else x[r, c - 1])


def jpeg_lossless(image: np.ndarray) -> bytes:
    """``image`` (rows, columns) uint16 as a JPEG Lossless SV1 bitstream."""
    rows, cols = image.shape
    # Every difference category 0..16 gets a 5-bit code: 0b00000, 0b00001, ...
    table = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    frame = bytes([PRECISION]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    scan = bytes([1, 1, 0x00, 1, 0, 0])  # one component, tables 0, predictor 1, point transform 0
    bits = _Bits()
    x = image.astype(np.int64)
    for r in range(rows):
        for c in range(cols):
            diff = int((x[r, c] - _predicted(x, r, c) + 32768) % 65536) - 32768
            size = abs(diff).bit_length()
            bits.put(size, 5)
            if size:
                bits.put(diff if diff > 0 else diff + (1 << size) - 1, size)
    return (
        b"\xff\xd8"
        + _segment(0xFFC3, frame)
        + _segment(0xFFC4, table)
        + _segment(0xFFDA, scan)
        + bits.close()
        + b"\xff\xd9"
    )


def _jpeg_series(folder, array, geometry):
    paths = write_dicom_series(folder, array, geometry)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([jpeg_lossless(ds.pixel_array)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(path, enforce_file_format=True)
    return paths


def test_jpeg_lossless_series_decodes_exactly(tmp_path):
    pytest.importorskip("libjpeg", reason="the optional decoder: pip install 'medseg[jpeg]' (make setup installs it)")
    geometry = make_geometry((7, 6, 3))
    array = np.round(phantom(geometry.shape) * 4)
    paths = _jpeg_series(tmp_path / "jpeg", array, geometry)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    np.testing.assert_array_equal(read_scan(tmp_path / "jpeg").array[0], array)


def test_jpeg_lossless_decoder_is_registered():
    pytest.importorskip("libjpeg", reason="the optional decoder: pip install 'medseg[jpeg]' (make setup installs it)")
    from pydicom.pixels.decoders import JPEGLosslessSV1Decoder

    assert JPEGLosslessSV1Decoder.is_available, "pip install 'medseg[jpeg]'"


def test_without_the_decoder_the_message_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from medseg.io.dicom import _decode_hint

    geometry = make_geometry((7, 6, 3))
    paths = _jpeg_series(tmp_path / "jpeg", np.round(phantom(geometry.shape) * 4), geometry)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libjpeg" else real(name, *a))
    assert "pip install 'medseg[jpeg]'" in _decode_hint(paths[0])
