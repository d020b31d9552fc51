"""DICOM series: group slices into series, check them, and assemble one into a Volume.

Which files form which series is decided by ``medseg.io.discover`` (the one read path).

Measured pitfalls this module guards against (see ``shared/notes/dicom-seg.md``):

* a folder may hold several series, and some series have an empty SeriesInstanceUID (the
  TotalSegmentator CT): files are grouped by UID, falling back to frame of reference +
  orientation + pixel size + matrix when the UID is empty;
* slices are ordered by their position along the slice normal, never by InstanceNumber or
  file name, and the slice step is taken from those positions, never from SliceThickness;
* a series with missing slices, duplicate positions, mixed orientations or gantry tilt
  cannot be put on a regular grid without resampling, so it is refused with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
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
class DicomSeries:
    """The slices that form one series, in file-discovery order (not yet sorted)."""

    uid: str
    slices: tuple[DicomSlice, ...] = field(repr=False)

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


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
        return None


def _to_slice(path: Path, ds) -> DicomSlice | str:
    """Header facts of ``ds``, or why it is not a single-frame image slice."""
    if getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") == _DICOMDIR_SOP_CLASS:
        return "DICOMDIR index (its series are found by walking the folder)"
    modality = str(ds.get("Modality", "") or "?")
    needed = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows")
    if modality not in _NON_IMAGE_MODALITIES and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return (
            "multi-frame (enhanced) DICOM image, which medseg does not read yet; convert it "
            "to single-frame files or NIfTI (for example with dcm2niix)"
        )
    # Headers are read without pixel data, so image-ness is judged from the geometry tags.
    if modality in _NON_IMAGE_MODALITIES or any(ds.get(tag) in (None, "") for tag in needed):
        return f"DICOM {modality} object without image position/orientation (not a slice of a volume)"
    return DicomSlice(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""),
        orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
        position=tuple(float(v) for v in ds.ImagePositionPatient),
        pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=str(ds.get("SeriesNumber", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
    )


def _series_key(s: DicomSlice) -> str:
    if s.series_uid:
        return s.series_uid
    # Empty UID: files of one acquisition still share frame of reference and in-plane grid.
    rounded = ",".join(f"{v:.4f}" for v in (*s.orientation, *s.pixel_spacing))
    return f"geometry:{s.frame_of_reference}|{rounded}|{s.rows}x{s.columns}"


def scan_files(paths: Iterable[Path]) -> tuple[list[DicomSlice], list[tuple[Path, str]]]:
    """The image slices among ``paths``, and every other file with the reason it is not one."""
    slices: list[DicomSlice] = []
    others: list[tuple[Path, str]] = []
    for path in paths:
        ds = _read_header(path)
        if ds is None:
            others.append((path, "not a scan (neither NIfTI/NRRD/MHA by suffix nor DICOM)"))
            continue
        s = _to_slice(path, ds)
        if isinstance(s, str):
            others.append((path, s))
        else:
            slices.append(s)
    return slices, others


def group_series(slices: Iterable[DicomSlice]) -> list[DicomSeries]:
    """Slices grouped into series (by UID, or by geometry where the UID is empty)."""
    groups: dict[str, list[DicomSlice]] = {}
    for s in slices:
        groups.setdefault(_series_key(s), []).append(s)
    return [DicomSeries(uid=k, slices=tuple(v)) for k, v in groups.items()]


def _check_series(series: DicomSeries) -> tuple[list[DicomSlice], float, np.ndarray]:
    """Slices sorted along the normal, the slice step (mm) and the (3, 3) direction (LPS).

    Raises ScanError for mixed orientations or grids, duplicates, gaps and gantry tilt.
    """
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


def _pixels(path: Path) -> np.ndarray:
    """(columns, rows) float32 of one slice, rescale slope/intercept applied."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for bad pixel data
        raise ScanError(
            path,
            f"pixel data cannot be decoded ({type(err).__name__}: {err})",
            "check the file is complete; compressed syntaxes need pylibjpeg plugins",
        ) from err
    if arr.ndim != 2:
        raise ScanError(path, f"pixel data has shape {arr.shape}; expected one grey-scale frame")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (arr.astype(np.float32) * slope + intercept).T


def read_series(series: DicomSeries) -> Volume:
    """Assemble ``series`` into a Volume (1, X=columns, Y=rows, Z=slices), LPS geometry."""
    ordered, step, direction = _check_series(series)
    first = ordered[0]
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
