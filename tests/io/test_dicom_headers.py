"""Malformed DICOM headers: discovery never raises; the file is skipped naming the tag and
value, or its series fails at read naming the file (never "duplicate slices")."""

import numpy as np
import pydicom
import pytest
from helpers import make_geometry, phantom, write_dicom_series
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from medseg.errors import ScanError
from medseg.io import read_scan
from medseg.io.discover import discover, read_source

GEOMETRY = make_geometry((6, 5, 4), (0.8, 0.7, 2.0))


def set_raw(path, keyword: str, text: str) -> None:
    """Store ``text`` verbatim as ``keyword``'s value: pydicom refuses to write bad values."""
    ds = pydicom.dcmread(path)
    tag = Tag(tag_for_keyword(keyword))
    value = text.encode() + b" " * (len(text) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    ds.save_as(path)


def remove(path, keyword: str) -> None:
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(path)


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "series"
    paths = write_dicom_series(folder, np.round(phantom(GEOMETRY.shape)), GEOMETRY)
    return folder, paths


@pytest.mark.parametrize(
    ("keyword", "text", "message"),
    [
        ("ImagePositionPatient", "abc\\def\\ghi", r"ImagePositionPatient is 'abc\\def\\ghi', which is not 3 numbers"),
        ("PixelSpacing", "0.5", r"PixelSpacing holds 1 value\(s\) \('0.5'\) where 2 are needed"),
        ("PixelSpacing", "0\\0.5", r"PixelSpacing is '0\\0.5': pixel spacing must be positive"),
        ("ImageOrientationPatient", "0\\0\\0\\0\\0\\0", "ImageOrientationPatient is all zero"),
        ("ImageOrientationPatient", "1\\0\\0\\0.7\\0.7\\0", "is not two perpendicular unit vectors"),
        ("ImagePositionPatient", "1\\2\\nan", "which is not finite"),
    ],
)
def test_malformed_tag_fails_its_series_naming_file_and_value(series, keyword, text, message):
    folder, paths = series
    set_raw(paths[1], keyword, text)
    found = discover(folder)  # never raises
    (scan,) = found.scans
    assert scan.series.broken[0].path == paths[1]
    assert paths[1] in scan.files
    with pytest.raises(ScanError, match=message) as err:
        read_source(scan)
    assert err.value.path == paths[1]
    assert "duplicate" not in str(err.value)


def test_missing_columns_names_the_tag(series):
    folder, paths = series
    remove(paths[2], "Columns")
    with pytest.raises(ScanError, match=rf"{paths[2].name}: Columns is missing; its series .* cannot be assembled"):
        read_scan(folder)


def test_malformed_file_without_series_uid_is_skipped_with_reason(tmp_path):
    paths = write_dicom_series(tmp_path / "s", np.round(phantom(GEOMETRY.shape)), GEOMETRY, series_uid="")
    set_raw(paths[0], "ImagePositionPatient", "abc\\def\\ghi")
    found = discover(tmp_path / "s")
    (skipped,) = found.skipped
    assert skipped.path == paths[0] and "ImagePositionPatient is 'abc\\def\\ghi'" in skipped.reason
    assert len(found.scans) == 1 and paths[0] not in found.scans[0].files


def test_series_with_every_orientation_zeroed_is_listed_file_by_file(series):
    folder, paths = series
    for path in paths:
        set_raw(path, "ImageOrientationPatient", "0\\0\\0\\0\\0\\0")
    found = discover(folder)
    assert found.scans == ()
    assert sorted(s.path for s in found.skipped) == sorted(paths)
    assert all("all zero" in s.reason for s in found.skipped)


def _pixel_offset(path) -> int:
    with path.open("rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        return f.tell()


def test_header_only_copy_is_reported_as_such_not_as_a_duplicate(series):
    folder, paths = series
    data = paths[2].read_bytes()
    (folder / "copy_of_slice").write_bytes(data[: _pixel_offset(paths[2])])
    with pytest.raises(ScanError, match=r"copy_of_slice: holds no pixel data, only a header"):
        read_scan(folder)


def test_cut_short_pixel_data_is_reported_as_truncated(series):
    folder, paths = series
    data = paths[2].read_bytes()
    (folder / "copy_of_slice").write_bytes(data[:-7])
    with pytest.raises(ScanError, match=r"copy_of_slice: pixel data is cut short: \d+ of 60 bytes are present"):
        read_scan(folder)


def test_malformed_rescale_is_a_scan_error(series):
    folder, paths = series
    set_raw(paths[0], "RescaleSlope", "one")
    with pytest.raises(ScanError, match=r"RescaleSlope is 'one', which is not 1 numbers"):
        read_scan(folder)


def test_colour_series_says_what_it_found(series):
    folder, paths = series
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
        ds.save_as(path)
    with pytest.raises(ScanError, match=r"holds a colour image \(3 samples per pixel\), not one grey-scale frame"):
        read_scan(folder)


def test_garbage_after_the_preamble_is_skipped_not_raised(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    found = discover(tmp_path)
    (skipped,) = found.skipped
    assert skipped.path.name == "junk.dcm" and found.scans == ()


def test_deflated_series_is_not_mistaken_for_header_only_files(series):
    """Deflate compresses the whole data set: the pixel data's offset cannot be checked."""
    folder, paths = series
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    found = discover(folder)
    assert found.skipped == () and found.scans[0].series.broken == ()
    assert read_source(found.scans[0]).geometry.shape == GEOMETRY.shape
