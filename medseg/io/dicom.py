"""DICOM series: group slices into series, check them, and assemble one into a Volume.

Which files form which series is decided by ``medseg.io.discover`` (the one read path).

Measured pitfalls this module guards against (see ``shared/notes/dicom-seg.md``):

* a folder may hold several series, and some series have an empty SeriesInstanceUID (the
  TotalSegmentator CT): files are grouped by UID, falling back to frame of reference +
  orientation + pixel size + matrix when the UID is empty;
* slices are ordered by their position along the slice normal, never by InstanceNumber or
  file name, and the slice step is taken from those positions, never from SliceThickness;
* a series with missing slices, duplicate positions, mixed orientations or gantry tilt
  cannot be put on a regular grid without resampling, so it is refused with the reason;
* every header value is parsed inside the per-file boundary (:func:`scan_files` never
  raises): a file with a malformed geometry tag or without pixel data is either skipped
  with the tag and value, or, when it names a series, makes that series fail at read time
  naming the file, rather than leaving it out and shortening the volume silently.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
from medseg.io.readers import MAX_VOXELS, check_voxel_count
from medseg.io.volume import Geometry, Volume

logger = logging.getLogger(__name__)

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}
# Positions and orientations are decimal strings with about 6 significant digits.
_ORIENTATION_TOL = 1e-4
_POSITION_TOL_MM = 1e-3
# Gantry tilt: slice origins drifting sideways by more than this many degrees.
_TILT_TOL_DEG = 0.05


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


@dataclass(frozen=True)
class DicomSeries:
    """The slices that form one series, in file-discovery order (not yet sorted), and the
    files of the series that could not be placed (``broken``: the series cannot be read)."""

    uid: str
    slices: tuple[DicomSlice, ...] = field(repr=False)
    broken: tuple[BrokenSlice, ...] = field(default=(), repr=False)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the series, broken ones included."""
        return tuple(s.path for s in self.slices) + tuple(b.path for b in self.broken)

    @property
    def description(self) -> str:
        return self.slices[0].series_description

    @property
    def number(self) -> str:
        return self.slices[0].series_number

    @property
    def folder(self) -> Path:
        return self.slices[0].path.parent

    def summary(self) -> str:
        first = self.slices[0]
        uid = self.uid if not self.uid.startswith("geometry:") else "(empty SeriesInstanceUID)"
        return (
            f"series {first.series_number or '?'} '{first.series_description}' {first.modality} "
            f"{first.columns}x{first.rows}x{len(self.slices)} uid={uid}"
        )


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


def _series_key(s: DicomSlice) -> str:
    if s.series_uid:
        return s.series_uid
    # Empty UID: files of one acquisition still share frame of reference and in-plane grid.
    rounded = ",".join(f"{v:.4f}" for v in (*s.orientation, *s.pixel_spacing))
    return f"geometry:{s.frame_of_reference}|{rounded}|{s.rows}x{s.columns}"


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


def group_series(slices: Iterable[DicomSlice | BrokenSlice]) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Slices grouped into series (by UID, or by geometry where the UID is empty), with each
    broken slice in its UID's series; broken slices of no readable series, with their reason."""
    groups: dict[str, list[DicomSlice]] = {}
    broken: dict[str, list[BrokenSlice]] = {}
    for s in slices:
        if isinstance(s, BrokenSlice):
            broken.setdefault(s.series_uid, []).append(s)
        else:
            groups.setdefault(_series_key(s), []).append(s)
    series = [DicomSeries(uid=k, slices=tuple(v), broken=tuple(broken.pop(k, ()))) for k, v in groups.items()]
    orphans = [(b.path, f"{b.problem} (no other file of its series could be read)") for v in broken.values() for b in v]
    return series, orphans


def _check_series(series: DicomSeries) -> tuple[list[DicomSlice], float, np.ndarray]:
    """Slices sorted along the normal, the slice step (mm) and the (3, 3) direction (LPS).

    Raises ScanError for broken files, mixed orientations or grids, duplicates, gaps and
    gantry tilt.
    """
    _check_no_broken(series)
    _check_one_stack(series)
    first = series.slices[0]
    row = np.asarray(first.orientation[:3])
    col = np.asarray(first.orientation[3:])
    normal = np.cross(row, col)
    positions = np.asarray([s.position for s in series.slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    ordered = [series.slices[i] for i in order]
    step = _check_steps(series.folder, ordered, along[order])
    _check_tilt(series.folder, positions[order], along[order], normal)
    direction = np.stack([row, col, normal], axis=1)
    return ordered, step, direction


def _check_no_broken(series: DicomSeries) -> None:
    """Refuse a series with a file that names it but cannot be placed: leaving that file out
    would silently shorten the volume (or report it as a gap or a duplicate)."""
    if series.broken:
        bad = series.broken[0]
        others = len(series.broken) - 1
        more = f" ({others} more file(s) of the series are broken too)" if others else ""
        raise ScanError(
            bad.path,
            f"{bad.problem}; its series in {series.folder} cannot be assembled without it{more}",
            "re-copy or re-export the file (a broken header or an incomplete copy), or remove it from the series",
        )


def _check_one_stack(series: DicomSeries) -> None:
    """At least two slices, all of one orientation, matrix size and pixel spacing."""
    folder = series.folder
    first = series.slices[0]
    for s in series.slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise ScanError(
                folder,
                f"series mixes slice orientations: {first.path.name} has "
                f"{np.round(first.orientation, 4).tolist()}, {s.path.name} has "
                f"{np.round(s.orientation, 4).tolist()}",
                "a series must be one stack of parallel slices; remove localizers or reformats from the folder",
            )
        if (s.rows, s.columns) != (first.rows, first.columns) or not np.allclose(
            s.pixel_spacing, first.pixel_spacing, atol=_ORIENTATION_TOL
        ):
            raise ScanError(
                folder,
                f"series mixes image grids: {first.path.name} is {first.columns}x{first.rows} "
                f"at {first.pixel_spacing} mm, {s.path.name} is {s.columns}x{s.rows} at "
                f"{s.pixel_spacing} mm",
                "a series must hold slices of one matrix size and pixel spacing",
            )
    if len(series.slices) < 2:
        raise ScanError(
            first.path,
            "is a single 2D image, not a volume",
            "medseg segments 3D scans: give it a series with at least two slices",
        )


def _check_steps(folder: Path, ordered: list[DicomSlice], along: np.ndarray) -> float:
    """The slice step (mm) of slices sorted by ``along`` (N,) (mm along the normal).

    Raises ScanError for duplicated positions, missing slices and uneven spacing.
    """
    steps = np.diff(along)
    dup = np.flatnonzero(steps < _POSITION_TOL_MM)
    if dup.size:
        a, b = ordered[dup[0]], ordered[dup[0] + 1]
        raise ScanError(
            folder,
            f"{dup.size} duplicate slice position(s): {a.path.name} and {b.path.name} both "
            f"lie at {along[dup[0]]:.3f} mm along the slice normal",
            "remove the duplicated files (a series copied twice into one folder?)",
        )
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        a, b = ordered[gaps[0]], ordered[gaps[0] + 1]
        missing = round(steps[gaps[0]] / step) - 1
        raise ScanError(
            folder,
            f"series has missing slices: {steps[gaps[0]]:.3f} mm between {a.path.name} and "
            f"{b.path.name} where the step is {step:.3f} mm (about {missing} slice(s) missing)",
            "copy the complete series; medseg will not interpolate across a gap",
        )
    uneven = np.flatnonzero(np.abs(steps - step) > max(_POSITION_TOL_MM * 10, 0.01 * step))
    if uneven.size:
        raise ScanError(
            folder,
            f"slice spacing is not uniform: steps range {steps.min():.3f}-{steps.max():.3f} mm",
            "resample the series to a regular grid (for example with dcm2niix) first",
        )
    return step


def _check_tilt(folder: Path, positions: np.ndarray, along: np.ndarray, normal: np.ndarray) -> None:
    """Raise ScanError when sorted slice ``positions`` (N, 3) drift sideways off the ``normal``
    (3,) as they advance ``along`` (N,) it: gantry tilt, which one affine cannot describe."""
    offsets = positions - positions[0]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    tilt = np.degrees(np.arctan2(sideways[1:], np.maximum(along[1:] - along[0], 1e-9)))
    if tilt.size and tilt.max() > _TILT_TOL_DEG and sideways.max() > 10 * _POSITION_TOL_MM:
        raise ScanError(
            folder,
            f"slices are sheared (gantry tilt of about {tilt.max():.2f} degrees): their "
            "positions do not advance along the slice normal",
            "resample the series to an orthogonal grid first (dcm2niix corrects gantry tilt)",
        )


# JPEG baseline, extended, lossless and lossless SV1: decoded by pylibjpeg-libjpeg only.
_LIBJPEG_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
)


def _decode_hint(path: Path) -> str:
    """What to do about pixel data that cannot be decoded: the missing plugin, if that is it."""
    import importlib.util

    import pydicom

    try:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:  # the header may be what is broken
        syntax = ""
    if syntax in _LIBJPEG_SYNTAXES and importlib.util.find_spec("libjpeg") is None:
        return "this JPEG transfer syntax needs the optional decoder: pip install 'medseg[jpeg]' (GPLv3)"
    return "check the file is complete; compressed syntaxes need pylibjpeg plugins"


def _pixels(path: Path) -> np.ndarray:
    """(columns, rows) float32 of one slice, rescale slope/intercept applied."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for bad pixel data
        raise ScanError(
            path,
            f"pixel data cannot be decoded ({type(err).__name__}: {_clip(str(err), 200)})",
            _decode_hint(path),
        ) from err
    if arr.ndim != 2:
        samples = _text(ds, "SamplesPerPixel") or "?"
        what = f"a colour image ({samples} samples per pixel)" if arr.ndim == 3 else f"pixels of shape {arr.shape}"
        raise ScanError(path, f"holds {what}, not one grey-scale frame", "medseg segments grey-scale scans")
    try:
        (slope,) = _numbers(ds, "RescaleSlope", 1, default=(1.0,))
        (intercept,) = _numbers(ds, "RescaleIntercept", 1, default=(0.0,))
    except _Malformed as err:
        raise ScanError(path, str(err), "fix the rescale tags or re-export the series") from err
    return (arr.astype(np.float32) * (slope or 1.0) + intercept).T


def read_series(series: DicomSeries, max_voxels: int | None = None) -> Volume:
    """Assemble ``series`` into a Volume (1, X=columns, Y=rows, Z=slices), LPS geometry.

    ``max_voxels`` (default ``medseg.io.readers.MAX_VOXELS``) bounds the series' size,
    checked from the headers before any pixel is decoded.
    """
    ordered, step, direction = _check_series(series)
    first = ordered[0]
    limit = MAX_VOXELS if max_voxels is None else max_voxels
    check_voxel_count(series.folder, (first.columns, first.rows, len(ordered)), limit)
    array = np.stack([_pixels(s.path) for s in ordered], axis=-1)
    geometry = Geometry(
        shape=tuple(array.shape),
        # PixelSpacing is (between rows, between columns): x steps between columns.
        spacing=(first.pixel_spacing[1], first.pixel_spacing[0], step),
        origin=tuple(first.position),
        direction=tuple(direction.ravel()),
    )
    description = " ".join(p for p in (first.series_number, first.series_description) if p)
    return Volume(array[None], geometry, series.folder, description)


def ordered_slices(series: DicomSeries) -> list[DicomSlice]:
    """The slices of a valid ``series`` in the order a Volume's k axis follows."""
    return _check_series(series)[0]
