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
* every header value is parsed inside the per-file boundary (``medseg.io.dicom_headers``):
  a file with a malformed geometry tag or without pixel data is either skipped with the tag
  and value, or, when it names a series, makes that series fail at read time naming the
  file, rather than leaving it out and shortening the volume silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
from medseg.io.dicom_headers import (  # noqa: F401 (DicomSlice, BrokenSlice, scan_files: re-exported)
    BrokenSlice,
    DicomSlice,
    _clip,
    _Malformed,
    _numbers,
    _text,
    scan_files,
)
from medseg.io.readers import MAX_VOXELS, check_voxel_count
from medseg.io.volume import Geometry, Volume

logger = logging.getLogger(__name__)

# Positions and orientations are decimal strings with about 6 significant digits.
_ORIENTATION_TOL = 1e-4
_POSITION_TOL_MM = 1e-3
# Gantry tilt: slice origins drifting sideways by more than this many degrees.
_TILT_TOL_DEG = 0.05


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


def _series_key(s: DicomSlice) -> str:
    if s.series_uid:
        return s.series_uid
    # Empty UID: files of one acquisition still share frame of reference and in-plane grid.
    rounded = ",".join(f"{v:.4f}" for v in (*s.orientation, *s.pixel_spacing))
    return f"geometry:{s.frame_of_reference}|{rounded}|{s.rows}x{s.columns}"


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
