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
import re
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ScanError
from medseg.io import dicom
from medseg.io.readers import scan_suffix

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


def sanitise(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]``: other runs become "_", no leading dots."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scan"


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
