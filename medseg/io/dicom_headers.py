"""DICOM headers, one file at a time: what places a slice in a series, or why it cannot.

Every header value is parsed inside the per-file boundary (:func:`scan_files` never
raises): a file with a malformed geometry tag, or without (or with cut-short) pixel data,
becomes a :class:`BrokenSlice` when it names a series (the series then fails at read time,
naming the file, rather than being silently shortened) or a skip reason otherwise.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}


@dataclass(frozen=True)
class DicomSlice:
    """The header facts of one single-frame DICOM image that place it in a series."""

    path: Path
    series_uid: str
    frame_of_reference: str
    orientation: tuple[float, ...]  # ImageOrientationPatient: row cosine, column cosine
    position: tuple[float, float, float]  # ImagePositionPatient (LPS mm)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int
    columns: int
    series_description: str
    series_number: str
    modality: str


@dataclass(frozen=True)
class BrokenSlice:
    """A DICOM image of a series that cannot be placed in it: a malformed geometry tag, or
    no (or cut-short) pixel data. Its series then fails to read, naming this file."""

    path: Path
    series_uid: str
    problem: str  # the tag and value at fault, or what is missing


class _Malformed(Exception):
    """A header value that cannot place a slice; the message names the tag and value."""


_NOT_A_SCAN = "not a scan (neither NIfTI/NRRD/MHA by suffix nor DICOM)"
# Value representations whose explicit-VR element header has a 4-byte length.
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"}
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Real headers are within 2e-5 of orthonormal (measured on ../shared/data); this leaves room
# for writers that print fewer digits, and catches zeroed or garbled orientations.
_UNIT_TOL = 1e-3


def _examine(path: Path) -> DicomSlice | BrokenSlice | str:
    """What the file at ``path`` is: an image slice, a broken slice of a series, or why it
    is neither. Never raises: this is the per-file boundary of discovery."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with path.open("rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            pixels = _pixel_problem(f, ds, path.stat().st_size)
        return _to_slice(path, ds, pixels)
    except InvalidDicomError:
        return _NOT_A_SCAN
    except OSError as err:
        return f"cannot be read ({err.strerror or err}); check that this user may read it"
    except Exception as err:  # pydicom parses lazily: a corrupt element raises any type, anywhere
        problem = f"{type(err).__name__}: {_clip(str(err))}"
        return f"DICOM file whose header cannot be parsed ({problem}); it is corrupt: re-copy or re-export it"


def _pixel_problem(f, ds, size: int) -> str:
    """Why the pixel data element at ``f``'s position (where reading stopped) is unusable;
    "" when it looks whole. Compressed frames are checked when they are decoded."""
    syntax = getattr(ds.get("file_meta", None), "TransferSyntaxUID", None)
    if getattr(syntax, "is_deflated", False):
        return ""  # pydicom read an inflated copy: positions in the file mean nothing
    start = f.tell()
    head = f.read(12)
    if len(head) < 8:
        return "holds no pixel data, only a header (a truncated or header-only copy?)"
    implicit, little = ds.original_encoding
    if implicit is None:
        return ""
    order = "<" if little else ">"
    if implicit:
        length, offset = struct.unpack(order + "I", head[4:8])[0], 8
    elif head[4:6] in _LONG_VRS and len(head) == 12:
        length, offset = struct.unpack(order + "I", head[8:12])[0], 12
    else:
        length, offset = struct.unpack(order + "H", head[6:8])[0], 8
    present = size - start - offset
    if length != _UNDEFINED_LENGTH and present < length:
        return f"pixel data is cut short: {max(present, 0):,} of {length:,} bytes are present (a truncated copy?)"
    return ""


def _to_slice(path: Path, ds, pixel_problem: str) -> DicomSlice | BrokenSlice | str:
    """Header facts of ``ds``, the problem of a malformed image slice, or why it is not one."""
    if getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") == _DICOMDIR_SOP_CLASS:
        return "DICOMDIR index (its series are found by walking the folder)"
    modality = _text(ds, "Modality") or "?"
    uid = _text(ds, "SeriesInstanceUID")
    try:
        if modality not in _NON_IMAGE_MODALITIES and _integer(ds, "NumberOfFrames", default=1) > 1:
            return (
                "multi-frame (enhanced) DICOM image, which medseg does not read yet; convert it "
                "to single-frame files or NIfTI (for example with dcm2niix)"
            )
        # Headers are read without pixel data, so image-ness is judged from the geometry tags.
        if modality in _NON_IMAGE_MODALITIES or all(
            _value(ds, tag) in (None, "") for tag in ("ImageOrientationPatient", "ImagePositionPatient")
        ):
            return f"DICOM {modality} object without image position/orientation (not a slice of a volume)"
        return _placed(path, ds, uid, pixel_problem)
    except _Malformed as err:
        if uid:
            return BrokenSlice(path, uid, str(err))
        return f"{err}; with an empty SeriesInstanceUID no series can claim it, so it was left out"


def _placed(path: Path, ds, uid: str, pixel_problem: str) -> DicomSlice:
    """The DicomSlice of ``ds``; _Malformed for any geometry tag that cannot place it."""
    orientation = _orientation(ds)
    position = _numbers(ds, "ImagePositionPatient", 3)
    spacing = _numbers(ds, "PixelSpacing", 2)
    if min(spacing) <= 0:
        raise _Malformed(f"PixelSpacing is {_shown(spacing)}: pixel spacing must be positive")
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    if min(rows, columns) < 1:
        raise _Malformed(f"Rows and Columns are {rows} and {columns}: an image needs at least one of each")
    if pixel_problem:
        raise _Malformed(pixel_problem)
    return DicomSlice(
        path=path,
        series_uid=uid,
        frame_of_reference=_text(ds, "FrameOfReferenceUID"),
        orientation=orientation,
        position=position,
        pixel_spacing=spacing,
        rows=rows,
        columns=columns,
        series_description=_text(ds, "SeriesDescription"),
        series_number=_text(ds, "SeriesNumber"),
        modality=_text(ds, "Modality"),
    )


def _orientation(ds) -> tuple[float, ...]:
    """ImageOrientationPatient: two perpendicular unit vectors, else _Malformed saying so
    (a zeroed orientation would otherwise put every slice at one position)."""
    iop = _numbers(ds, "ImageOrientationPatient", 6)
    if not any(iop):
        raise _Malformed(f"ImageOrientationPatient is all zero ({_shown(iop)}): the slice has no orientation")
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    lengths = np.linalg.norm(row), np.linalg.norm(col)
    if max(abs(n - 1) for n in lengths) > _UNIT_TOL or abs(row @ col) > _UNIT_TOL:
        raise _Malformed(
            f"ImageOrientationPatient {_shown(iop)} is not two perpendicular unit vectors "
            f"(lengths {lengths[0]:.4f} and {lengths[1]:.4f}, dot product {row @ col:.4f})"
        )
    return iop


def _numbers(ds, keyword: str, count: int, default: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """``count`` finite numbers from the tag ``keyword`` (``default`` when absent), else
    _Malformed naming the tag and its value."""
    value = _value(ds, keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise _Malformed(f"{keyword} is missing")
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise _Malformed(f"{keyword} is {_shown(items)}, which is not {count} numbers") from None
    if len(numbers) != count:
        raise _Malformed(f"{keyword} holds {len(numbers)} value(s) ({_shown(items)}) where {count} are needed")
    if not np.isfinite(numbers).all():
        raise _Malformed(f"{keyword} is {_shown(items)}, which is not finite")
    return numbers


def _integer(ds, keyword: str, default: int | None = None) -> int:
    """The whole number in tag ``keyword`` (``default`` when absent), else _Malformed."""
    value = _value(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise _Malformed(f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Malformed(f"{keyword} is {_shown([value])}, not a whole number") from None


def _value(ds, keyword: str):
    """``ds.get(keyword)``; _Malformed when pydicom cannot decode the stored bytes (it
    decodes on first access, so a corrupt VR raises here, with any exception type)."""
    try:
        return ds.get(keyword)
    except Exception as err:
        raise _Malformed(f"{keyword} cannot be decoded ({type(err).__name__}: {_clip(str(err))})") from None


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _shown(values) -> str:
    """Header values as DICOM writes them ('a\\b\\c'), printable, at most 60 characters."""
    text = "\\".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return f"'{_clip(text.encode('ascii', 'backslashreplace').decode())}'"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scan_files(paths: Iterable[Path]) -> tuple[list[DicomSlice | BrokenSlice], list[tuple[Path, str]]]:
    """The image slices among ``paths`` (broken ones of a named series included), and every
    other file with the reason it is not one. Never raises for a file's content."""
    slices: list[DicomSlice | BrokenSlice] = []
    others: list[tuple[Path, str]] = []
    for path in paths:
        found = _examine(path)
        if isinstance(found, str):
            others.append((path, found))
        else:
            slices.append(found)
    return slices, others
