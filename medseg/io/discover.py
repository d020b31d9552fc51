"""Find every scan under a folder: NIfTI, NRRD and MHA files and DICOM series at any depth.

DICOM files are recognised by content (no suffix needed) and grouped into series across
folders (a series may be spread over several, and one folder may hold several series).
Anything else is skipped with a reason, so a run report can list it. Output names come
from the relative path (plus, for DICOM, the series number, description and a short UID
hash), reduced to ``[A-Za-z0-9._-]`` and made unique: never a path taken from a DICOM tag.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
from medseg.io import dicom
from medseg.io.files import sanitise
from medseg.io.readers import checked, read_file, scan_suffix
from medseg.io.volume import Volume

logger = logging.getLogger(__name__)

# Companion data files of header formats: found through their header, never on their own.
_DATA_SUFFIXES = (".raw", ".raw.gz", ".zraw", ".img", ".img.gz")
_DICOMDIR = "DICOMDIR"


@dataclass(frozen=True)
class ScanSource:
    """One scan found under ``root``: a file, or a DICOM series (its slices' headers)."""

    kind: str  # "nifti", "nrrd", "mha" or "dicom"
    path: Path  # the file, or the folder holding the series (their common parent)
    name: str  # output base name: unique within one discovery, [A-Za-z0-9._-] only
    series: dicom.DicomSeries | None = None

    @property
    def description(self) -> str:
        if self.series is None:
            return ""
        return " ".join(p for p in (self.series.number, self.series.description) if p)


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class Discovery:
    root: Path
    scans: tuple[ScanSource, ...]
    skipped: tuple[Skipped, ...]


def _kind(suffix: str) -> str:
    return {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd"}.get(suffix, "mha")


def _file_name(path: Path, root: Path, suffix: str) -> str:
    relative = path.relative_to(root).as_posix() if path != root else path.name
    return sanitise(relative[: -len(suffix)].replace("/", "__"))


def _series_name(series: dicom.DicomSeries, folder: Path, root: Path) -> str:
    relative = folder.relative_to(root).as_posix() if folder != root else root.name
    # The UID is hashed, never used verbatim; number and description are sanitised.
    uid_hash = hashlib.sha1(series.uid.encode()).hexdigest()[:6]
    parts = [relative.replace("/", "__"), f"S{series.number}" if series.number else "", series.description, uid_hash]
    return sanitise("_".join(p for p in parts if p))


def _unique(names: list[str]) -> list[str]:
    """Append -2, -3, ... to repeats (case-insensitively: some file systems fold case)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        out.append(name if seen[key] == 1 else f"{name}-{seen[key]}")
    return out


def _common_folder(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def discover(root: str | Path) -> Discovery:
    """Every scan under ``root`` (a folder, or a single scan file) and every skipped file."""
    root = Path(root)
    if not root.exists():
        raise ScanError(root, "does not exist", "check the path")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    base = root.parent if root.is_file() else root
    found: list[tuple[str, Path, dicom.DicomSeries | None, str]] = []
    skipped: list[Skipped] = []
    others: list[Path] = []
    for path in files:
        suffix = scan_suffix(path)
        name = path.name.lower()
        if name.endswith(".seg.nrrd"):
            skipped.append(Skipped(path, "3D Slicer segmentation (.seg.nrrd), not a scan"))
        elif suffix is not None:
            found.append((_kind(suffix), path, None, _file_name(path, base, suffix)))
        elif path.name.upper() == _DICOMDIR:
            skipped.append(Skipped(path, "DICOMDIR index (its series are found by walking the folder)"))
        elif name.endswith(_DATA_SUFFIXES):
            skipped.append(Skipped(path, "data file of a header format (read through its .mhd/.nhdr)"))
        else:
            others.append(path)
    slices, not_images = dicom.scan_files(others)
    skipped += [Skipped(p, reason) for p, reason in not_images]
    for series in dicom.group_series(slices):
        folder = _common_folder([s.path for s in series.slices])
        found.append(("dicom", folder, series, _series_name(series, folder, base)))
    found.sort(key=lambda f: (str(f[1]), f[3]))
    names = _unique([f[3] for f in found])
    scans = tuple(ScanSource(kind, path, name, series) for (kind, path, series, _), name in zip(found, names))
    return Discovery(root, scans, tuple(sorted(skipped, key=lambda s: str(s.path))))


@dataclass(frozen=True)
class ScanInput:
    """A path to segment and, when it is a DICOM folder of several series, the one wanted."""

    path: Path
    series_uid: str | None = None


def _only_series(scans: tuple[ScanSource, ...], uid: str, where: Path) -> list[ScanSource]:
    chosen = [s for s in scans if s.series is not None and s.series.uid == uid]
    if not chosen:
        raise ScanError(where, f"holds no DICOM series with UID {uid}", "list the series and their UIDs with --list")
    return chosen


def discover_all(inputs: Sequence[str | Path | ScanInput], series_uid: str | None = None) -> Discovery:
    """Discover each of ``inputs`` (files or folders) into one Discovery with unique names.

    ``series_uid`` keeps only that DICOM series among the plain paths; a :class:`ScanInput`
    names its own series.
    """
    requests = [i if isinstance(i, ScanInput) else ScanInput(Path(i)) for i in inputs]
    parts = [discover(r.path) for r in requests]
    scans: list[ScanSource] = []
    for request, part in zip(requests, parts):
        if request.series_uid is not None:
            scans += _only_series(part.scans, request.series_uid, request.path)
        elif series_uid is not None:
            scans += [s for s in part.scans if s.series is not None and s.series.uid == series_uid]
        else:
            scans += part.scans
    if series_uid is not None and not scans:
        _only_series((), series_uid, requests[0].path)
    names = _unique([s.name for s in scans])
    unique = tuple(ScanSource(s.kind, s.path, n, s.series) for s, n in zip(scans, names))
    paths = [str(r.path.absolute()) for r in requests]
    root = requests[0].path if len(requests) == 1 else Path(os.path.commonpath(paths))
    return Discovery(root, unique, tuple(k for p in parts for k in p.skipped))


def header_info(scan: ScanSource) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(size, spacing) of ``scan`` from headers only (no voxels read); empty if unreadable."""
    try:
        if scan.series is not None:
            first = scan.series.slices[0]
            normal = np.cross(first.orientation[:3], first.orientation[3:])
            along = np.sort([np.dot(s.position, normal) for s in scan.series.slices])
            step = float(np.median(np.diff(along))) if len(along) > 1 else 0.0
            size = (first.columns, first.rows, len(scan.series.slices))
            return size, (first.pixel_spacing[1], first.pixel_spacing[0], step)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(scan.path))
        reader.ReadImageInformation()
        return tuple(reader.GetSize()), tuple(reader.GetSpacing())
    except Exception:  # --list must show every scan, readable or not
        return (), ()


def read_source(scan: ScanSource) -> Volume:
    """The Volume of a discovered scan (a DICOM series is read from its known slices)."""
    if scan.series is not None:
        return checked(dicom.read_series(scan.series))
    return read_file(scan.path)


def single_scan(source: Path, series_uid: str | None = None) -> ScanSource:
    """The one scan at ``source``; ScanError when there is none or several."""
    found = discover_all([source], series_uid)
    if len(found.scans) == 1:
        return found.scans[0]
    if not found.scans:
        if source.is_dir():
            first = f": {found.skipped[0].path.name}: {found.skipped[0].reason}" if found.skipped else ""
            problem = f"holds no scan medseg can read ({len(found.skipped)} other file(s){first})"
        else:
            problem = "is not a scan medseg can read" + (f": {found.skipped[0].reason}" if found.skipped else "")
        raise ScanError(source, problem, "give a NIfTI/NRRD/MHA file or a DICOM series")
    what = "DICOM series" if all(s.series is not None for s in found.scans) else "scans"
    listing = "; ".join(_describe(s) for s in found.scans[:10])
    raise ScanError(
        source,
        f"holds {len(found.scans)} {what} where one was asked for: {listing}",
        "segment the whole folder with 'medseg segment', or pick a series with --series-uid",
    )


def _describe(scan: ScanSource) -> str:
    if scan.series is None:
        return f"{scan.name} ({scan.kind})"
    return f"{scan.name} ({scan.description or 'no description'}, uid {scan.series.uid})"


def read_scan(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read the one scan at ``path``: a NIfTI/NRRD/MHA file, a DICOM file or series folder.

    Every way medseg opens a scan goes through here or through :func:`discover`, so a path
    is judged the same everywhere (a multi-frame DICOM, a folder of several series...).
    ``series_uid`` picks one series when a DICOM folder holds several. Raises ScanError
    naming the file, what is wrong and what to do.
    """
    return read_source(single_scan(Path(path), series_uid))
