"""Find every scan under a folder: NIfTI, NRRD and MHA files and DICOM series at any depth.

DICOM files are recognised by content (no suffix needed) and grouped into series across
folders (a series may be spread over several, and one folder may hold several series).
Every path passed over is listed as skipped with its reason, so a run report accounts for
all of them: files that are not scans, folders that cannot be listed, symbolic links to
folders (not followed: they may loop or lead out of the tree), dangling links, FIFOs, and
the second sighting of a file found twice. Nothing in a file's content makes discovery
raise.

Output names come from the relative path (plus, for DICOM, the series number, description
and a short UID hash), reduced to ``[A-Za-z0-9._-]``, capped at :data:`MAX_NAME_CHARS`
and made unique by a hash of the scan's own relative path: never a path taken from a DICOM
tag, and never a running number, so adding a file never hands a name to another scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
from medseg.io import dicom
from medseg.io.files import sanitise
from medseg.io.readers import checked, header_data, read_file, scan_suffix
from medseg.io.volume import Volume

logger = logging.getLogger(__name__)

# Companion data files of header formats: found through their header, never on their own.
_DATA_SUFFIXES = (".raw", ".raw.gz", ".zraw", ".img", ".img.gz")
_DICOMDIR = "DICOMDIR"
_ANALYZE = (
    "Analyze 7.5 / NIfTI pair (.hdr + .img), which medseg does not read; convert it to one "
    ".nii.gz file (for example with nibabel or SimpleITK)"
)
#: Output base names are cut to this many characters (a hash of the full name replaces the
#: cut tail): temporary names add the format suffix twice and a random part, and most file
#: systems refuse names over 255 bytes.
MAX_NAME_CHARS = 100


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

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the scan's voxels come from, as found (not resolved): a series' slice
        files (broken ones included), an NRRD/MetaImage header followed by the data file(s)
        it names (``.raw``, ``.raw.gz``, ``.zraw``, ``.img``...; listed even when missing),
        or the file itself."""
        if self.series is not None:
            return self.series.files
        if self.kind == "nifti":
            return (self.path,)
        return tuple(dict.fromkeys((self.path, *header_data(self.path).files)))


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


def _short_hash(text: str, length: int = 6) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def _capped(name: str) -> str:
    """``name`` cut to MAX_NAME_CHARS, the cut tail replaced by a hash of the whole name."""
    if len(name) <= MAX_NAME_CHARS:
        return name
    return f"{name[: MAX_NAME_CHARS - 7]}-{_short_hash(name)}"


def _file_name(path: Path, root: Path, suffix: str) -> str:
    relative = path.relative_to(root).as_posix() if path != root else path.name
    return _capped(sanitise(relative[: -len(suffix)].replace("/", "__")))


def _series_name(series: dicom.DicomSeries, folder: Path, root: Path) -> str:
    relative = folder.relative_to(root).as_posix() if folder != root else root.name
    # The UID is hashed, never used verbatim; number and description are sanitised.
    parts = [relative.replace("/", "__"), f"S{series.number}" if series.number else "", series.description]
    return _capped(sanitise("_".join(p for p in (*parts, _short_hash(series.uid)) if p)))


def _unique(names: list[str], keys: list[str]) -> list[str]:
    """``names``, each one that several scans share (case-insensitively: some file systems
    fold case) followed by a hash of its scan's ``key`` (relative paths of its files).

    A name thus depends on its own scan only, never on how many others sort before it: a
    running number would pass "a-2" to another scan when a file is added.
    """
    counts = Counter(n.lower() for n in names)
    for length in (6, 40):  # 40: the whole hash, should 6 characters meet another name
        unique = [n if counts[n.lower()] == 1 else f"{n}-{_short_hash(k, length)}" for n, k in zip(names, keys)]
        if len({n.lower() for n in unique}) == len(unique):
            break
    return unique


def _named(scans: list[ScanSource], root: Path) -> list[ScanSource]:
    """``scans`` with unique names; clashes are settled by paths relative to ``root``."""
    keys = ["\n".join(os.path.relpath(p.absolute(), root.absolute()) for p in s.files) for s in scans]
    names = _unique([s.name for s in scans], keys)
    return [dataclasses.replace(s, name=n) for s, n in zip(scans, names)]


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte: compare as written
        return path.absolute()


def _without_repeats(scans: list[ScanSource]) -> tuple[list[ScanSource], list[Skipped]]:
    """``scans`` less those whose files (resolved) were already found: a link to a file of
    the tree, or one input given twice, is segmented once; the repeat is listed."""
    first: dict[tuple[Path, ...], ScanSource] = {}
    repeats: list[Skipped] = []
    for scan in scans:
        key = tuple(sorted(_resolved(p) for p in scan.files))
        if key in first:
            repeats.append(Skipped(scan.path, f"the same file(s) as {first[key].path}, found twice; segmented once"))
        else:
            first[key] = scan
    return list(first.values()), repeats


def _common_folder(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _passed_over(path: Path) -> str:
    """Why ``path``, neither a folder nor a regular file, is not read."""
    if path.is_symlink():
        if path.is_dir():
            return "symbolic link to a folder, not followed"
        if not path.exists():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"dangling symbolic link to {target} (its target does not exist or loops)"
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return f"cannot be examined ({err.strerror or err})"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO), not a file: not read (reading it could wait forever)"
    kind = "socket" if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
    return f"{kind} file, not a regular file: not read"


def _walk(folder: Path, skipped: list[Skipped], seen: set[tuple[int, int]]) -> Iterator[Path]:
    """Regular files under ``folder``, sorted, depth first (links to files included); every
    other entry goes to ``skipped`` with the reason. ``seen`` guards against loops."""
    try:
        info = folder.stat()
        if (info.st_dev, info.st_ino) in seen:
            skipped.append(Skipped(folder, "folder already searched (a loop or bind mount); not searched again"))
            return
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as err:
        skipped.append(Skipped(folder, f"folder cannot be listed ({err.strerror or err}); its files were not searched"))
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(path, skipped, seen)
            elif entry.is_file():  # follows a link to a file: read like the file
                yield path
            else:
                skipped.append(Skipped(path, _passed_over(path)))
        except OSError as err:
            skipped.append(Skipped(path, f"cannot be examined ({err.strerror or err})"))


def _by_suffix(path: Path, base: Path) -> ScanSource | Skipped | None:
    """What ``path``'s name says it is; None when only its content can tell (DICOM)."""
    suffix = scan_suffix(path)
    lower = path.name.lower()
    if lower.endswith(".seg.nrrd"):
        return Skipped(path, "3D Slicer segmentation (.seg.nrrd), not a scan")
    if suffix is not None:
        return ScanSource(_kind(suffix), path, _file_name(path, base, suffix))
    if path.name.upper() == _DICOMDIR:
        return Skipped(path, "DICOMDIR index (its series are found by walking the folder)")
    if lower.endswith(".hdr") and path.with_suffix(".img").is_file():
        return Skipped(path, _ANALYZE)
    return None


def _data_file_reason(path: Path, headers: dict[Path, Path]) -> str:
    header = headers.get(Path(os.path.normpath(path.absolute())))
    if header is not None:
        return f"data file of {header.name} (read through it)"
    if path.name.lower().endswith(".img") and path.with_suffix(".hdr").is_file():
        return _ANALYZE
    return "data file of a header format (.mhd/.nhdr), but no header found here names it"


def _scans(files: list[Path], base: Path, skipped: list[Skipped]) -> list[ScanSource]:
    """The scans among ``files`` (names relative to ``base``); the rest go to ``skipped``."""
    found: list[ScanSource] = []
    data_files: list[Path] = []
    others: list[Path] = []
    for path in files:
        judged = _by_suffix(path, base)
        if isinstance(judged, ScanSource):
            found.append(judged)
        elif isinstance(judged, Skipped):
            skipped.append(judged)
        elif path.name.lower().endswith(_DATA_SUFFIXES):
            data_files.append(path)
        else:
            others.append(path)
    headers = {Path(os.path.normpath(d.absolute())): s.path for s in found for d in s.files[1:]}
    skipped += [Skipped(p, _data_file_reason(p, headers)) for p in data_files]
    slices, not_images = dicom.scan_files(others)
    series, orphans = dicom.group_series(slices)
    skipped += [Skipped(p, reason) for p, reason in (*not_images, *orphans)]
    for s in series:
        folder = _common_folder(s.files)
        found.append(ScanSource("dicom", folder, _series_name(s, folder, base), s))
    return sorted(found, key=lambda f: (str(f.path), f.name))


def discover(root: str | Path) -> Discovery:
    """Every scan under ``root`` (a folder, or a single scan file) and every path passed
    over with the reason. Raises ScanError only when ``root`` itself does not exist."""
    root = Path(root)
    if not os.path.lexists(root):
        raise ScanError(root, "does not exist", "check the path")
    skipped: list[Skipped] = []
    if root.is_dir():  # a link given as the root is followed: the user named it
        base, files = root, list(_walk(root, skipped, set()))
    else:
        base, files = root.parent, [root] if root.is_file() else []
        if not files:
            skipped.append(Skipped(root, _passed_over(root)))
    scans, repeats = _without_repeats(_scans(files, base, skipped))
    scans = _named(scans, base)
    return Discovery(root, tuple(scans), tuple(sorted((*skipped, *repeats), key=lambda s: str(s.path))))


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
    paths = [str(r.path.absolute()) for r in requests]
    root = requests[0].path if len(requests) == 1 else Path(os.path.commonpath(paths))
    scans, repeats = _without_repeats(scans)
    unique = _named(scans, root if root.is_dir() else root.parent)
    return Discovery(root, tuple(unique), (*(k for p in parts for k in p.skipped), *repeats))


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


def read_source(scan: ScanSource, max_voxels: int | None = None, integers: bool = False) -> Volume:
    """The Volume of a discovered scan (a DICOM series is read from its known slices).

    ``max_voxels`` (default ``medseg.io.readers.MAX_VOXELS``) bounds the size a header may
    declare; larger scans are refused before their voxels are read. ``integers`` keeps a
    file's stored int8/uint8/int16 voxels in their type (``read_file``; DICOM series are
    float32 always, their rescale making other values). Raises ScanError.
    """
    if scan.series is not None:
        return checked(dicom.read_series(scan.series, max_voxels))
    return read_file(scan.path, max_voxels, integers)


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
