"""Read one NIfTI, NRRD or MHA/MHD file into a Volume (DICOM series: ``medseg.io.dicom``).

Readers return arrays (C, X, Y, Z) float32 (or, asked with ``integers=True``, the file's own
int8/uint8/int16 where no scaling applies: a CT's Hounsfield units in half the memory, the
same values) with LPS geometry and refuse, with a ScanError
naming the file, anything that is not a 3D scan with finite intensities on an orthogonal
grid. Headers are checked before any voxel is read: a few bytes of header can declare
gigabytes of voxels, so the declared size is held against :data:`MAX_VOXELS` and, for
uncompressed data, against the bytes really on disk.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import re
import zlib
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
from medseg.io.volume import Geometry, Volume

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

#: The most voxels (all channels together) a scan may declare before it is refused unread:
#: 2**29 = 512 Mi voxels, 2 GiB as float32, above a 512 x 512 x 2000 whole-body CT. Pass
#: ``max_voxels`` to the read functions (or set this constant) to change it.
MAX_VOXELS = 2**29

# Normalised voxel axes whose dot product exceeds this are sheared (cos 89.994 degrees).
_SHEAR_TOL = 1e-4
# Header text is read from the first bytes only; voxels may follow it in the same file.
_HEADER_BYTES = 64 * 1024
# More data files than this in one header is a corrupt pattern, not a scan.
_MAX_DATA_FILES = 100_000
# Voxels are converted to float32 this many bytes at a time (a few dozen 512x512 slices), so
# reading never holds the file's type and float32 for the whole volume at once.
_SLAB_BYTES = 32 * 2**20
#: Stored types ``integers=True`` keeps (in native byte order): every value exact in float32,
#: at most 2 bytes a voxel.
COMPACT_TYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16))
_FLOAT32 = np.dtype(np.float32)


def scan_suffix(path: Path) -> str | None:
    """The scan-format suffix of ``path`` (lower case), or None if it has none."""
    name = path.name.lower()
    return next((s for s in SCAN_SUFFIXES if name.endswith(s)), None)


def scan_name(path: Path) -> str:
    """``path``'s name without its scan suffix (a DICOM folder keeps its name)."""
    suffix = scan_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def read_file(path: Path, max_voxels: int | None = None, integers: bool = False) -> Volume:
    """Read the NIfTI/NRRD/MHA file at ``path`` (chosen by suffix) into a checked Volume.

    Scans are opened through ``medseg.io.read_scan`` (discovery decides what a path holds,
    DICOM included); this is the file-format step underneath it. ``max_voxels`` (default
    :data:`MAX_VOXELS`) bounds the voxels a header may declare. ``integers`` keeps voxels
    stored as int8, uint8 or int16 without scaling in that type (else float32).
    Raises ScanError naming the file, what is wrong and what to do.
    """
    suffix = scan_suffix(path)
    if suffix is None:
        raise ScanError(path, "has no NIfTI/NRRD/MHA suffix", "give a .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd file")
    _check_openable(path)
    if path.stat().st_size == 0:
        raise ScanError(path, "is empty (0 bytes)", "the copy or download did not finish")
    limit = MAX_VOXELS if max_voxels is None else max_voxels
    read = _read_nifti if suffix in NIFTI_SUFFIXES else _read_itk
    volume = read(path, limit, integers)
    return checked(volume)


def _check_openable(path: Path) -> None:
    """ScanError with the system's reason (permissions...) when ``path`` cannot be opened."""
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise ScanError(
            path, f"cannot be opened ({err.strerror or err})", "check that the file exists and this user may read it"
        ) from err


def check_voxel_count(path: Path, shape: tuple[int, ...], limit: int) -> None:
    """Refuse, before allocating, a scan whose header declares more than ``limit`` voxels."""
    count = int(np.prod([int(s) for s in shape], dtype=object))
    if count > limit:
        raise ScanError(
            path,
            f"declares {' x '.join(str(int(s)) for s in shape)} = {count:,} voxels, more than the limit of "
            f"{limit:,} (medseg.io.readers.MAX_VOXELS)",
            "the header is corrupt, or the scan is too large: crop or downsample it, or raise max_voxels",
        )


def _check_bytes(path: Path, declared: int, present: int, where: str) -> None:
    """Refuse uncompressed voxel data that the file(s) on disk are too short to hold."""
    if present < declared:
        raise ScanError(
            path,
            f"declares {declared:,} bytes of data but {where} only {present:,}",
            "the file is truncated or its header is corrupt; re-copy or re-export the scan",
        )


def _check_gzip_length(path: Path, declared: int) -> None:
    """Refuse a gzip file whose stream holds fewer than the ``declared`` bytes, before the
    reader allocates them all (a 107-byte file can declare gigabytes).

    The gzip trailer stores the stream's length modulo 2**32: when it matches, nothing
    more is read. Otherwise (several gzip members, trailing bytes, or a header that lies)
    the stream is decompressed once and counted, up to ``declared`` bytes, none kept.
    """
    try:
        with path.open("rb") as f:
            f.seek(-4, 2)
            if int.from_bytes(f.read(4), "little") == declared % 2**32:
                return
        present = 0
        with gzip.open(path, "rb") as stream:
            while present < declared and (chunk := stream.read(min(1 << 20, declared - present))):
                present += len(chunk)
    except (OSError, EOFError, zlib.error) as err:  # too short, bad CRC, not gzip
        raise _unreadable_nifti(path, err) from err
    _check_bytes(path, declared, present, "its compressed stream holds")


def _read_nifti(path: Path, limit: int, integers: bool = False) -> Volume:
    import nibabel as nib

    try:
        # No memory map (its pages would count as the process's memory until closed), one
        # open file for all slabs (a .gz stream is then read once, forwards).
        img = nib.load(str(path), mmap=False, keep_file_open=True)
        proxy = img.dataobj
        dtype, shape = np.dtype(proxy.dtype), tuple(int(s) for s in proxy.shape)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error, HeaderDataError...
        raise _unreadable_nifti(path, err) from err
    if dtype.names:
        raise ScanError(
            path,
            f"is an {''.join(dtype.names)} ({len(dtype.names)} components per voxel) image, not a grey-scale scan",
            "convert it to one intensity per voxel first (or split the colours into separate scans)",
        )
    check_voxel_count(path, shape, limit)
    _check_pixdim(path, img)
    declared = int(proxy.offset) + int(np.prod(shape)) * dtype.itemsize
    if path.name.lower().endswith(".gz"):
        _check_gzip_length(path, declared)
    else:
        _check_bytes(path, declared, path.stat().st_size, "it holds")
    if len(shape) < 3:
        raise _not_3d(path, shape)
    try:
        if dtype.kind == "c":
            # Complex voxels are read as they are (a cast to float32 would drop the imaginary part).
            array, notes = _real_valued(_channels_first(np.asarray(proxy)))
        else:
            # Scaling (scl_slope/inter) makes values of another type: then float32.
            unscaled = float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0
            native = dtype.newbyteorder("=")  # a big-endian file's int16 is int16 too
            keep = integers and native in COMPACT_TYPES and unscaled
            array, notes = _read_slabs(proxy, shape, native if keep else _FLOAT32), ()
        if path.name.lower().endswith(".gz"):
            _read_gzip_to_end(proxy)
    except Exception as err:  # truncated gzip streams, CRC errors, short reads...
        raise _unreadable_nifti(path, err) from err
    notes += _xform_notes(path, img)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)
    geometry = grid(path, shape[:3], lps[:3, :3], lps[:3, 3])
    return Volume(array, geometry, path, notes=notes)


def _channels_first(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z, ...) -> (C, X, Y, Z): dimensions past the third (time, vector components)
    become channels, in C order (the last one fastest)."""
    return np.moveaxis(array.reshape(*array.shape[:3], -1), -1, 0)


def _slab_slices(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """How many slices (along the third axis) make one slab of about :data:`_SLAB_BYTES`."""
    per_slice = int(np.prod(shape[:2])) * int(np.prod(shape[3:], dtype=np.int64)) * itemsize
    return max(1, _SLAB_BYTES // max(1, per_slice))


def _read_slabs(proxy, shape: tuple[int, ...], dtype: np.dtype = _FLOAT32) -> np.ndarray:
    """A NIfTI's voxels (C, X, Y, Z) C-contiguous ``dtype``, filled slab by slab from ``proxy``.

    Equal to ``np.asarray(proxy, dtype=dtype)`` put channel first (scaling included; tests
    hold them equal), without ever holding the stored type (int16 for CT) and the float32
    array whole at once, nor a second copy for the channel-first order.
    """
    channels = int(np.prod(shape[3:], dtype=np.int64))
    out = np.empty((channels, *shape[:3]), dtype=dtype)
    step = _slab_slices(shape)
    for k in range(0, shape[2], step):
        # The proxy applies the header's scaling (scl_slope/inter) as np.asarray(proxy) does.
        out[:, :, :, k : k + step] = _channels_first(np.asarray(proxy[:, :, k : k + step]))
    return out


def _check_pixdim(path: Path, img) -> None:
    """Refuse zero, negative or non-finite voxel sizes where the header's pixdim places the
    voxels (no sform). nibabel quietly turns such sizes into 1 mm when it loads a header,
    so the header is read again as stored."""
    from nibabel.openers import ImageOpener

    if int(img.header["sform_code"]) > 0:
        return  # the sform places the voxels; it is checked with the grid
    try:
        with ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        sizes = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # the header was readable a moment ago; leave the grid check to judge
        return
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ScanError(
            path,
            f"has voxel sizes {tuple(float(v) for v in sizes)} mm in its header (pixdim): "
            "zero, negative or not a number",
            "fix the header (the voxel spacing) or re-export the scan",
        )


def _read_gzip_to_end(proxy) -> None:
    """Read a .nii.gz stream past the voxels to its end, where gzip checks the CRC and length
    of all it decompressed: nibabel reads only the bytes the voxels need, and a stream read
    short of its end is never checked, so a flipped bit would be segmented as if nothing were
    wrong. Raises what gzip raises (BadGzipFile, EOFError) for a corrupt stream.

    Uses the file nibabel keeps open (``keep_file_open=True``), positioned after the voxels:
    nothing is decompressed twice. Without it (another nibabel), the file is decompressed
    once more, to its end.
    """
    opener = getattr(proxy, "_opener", None)
    stream = getattr(opener, "fobj", None)
    if stream is not None and not stream.closed:
        while stream.read(2**20):
            pass
        return
    with gzip.open(proxy.file_like, "rb") as whole:
        while whole.read(2**24):
            pass


def _unreadable_nifti(path: Path, err: Exception) -> ScanError:
    return ScanError(
        path,
        f"cannot be read as NIfTI ({type(err).__name__}: {err})",
        "the file is truncated, corrupt or not a NIfTI image; re-export or re-copy it",
    )


def _xform_notes(path: Path, img) -> tuple[str, ...]:
    """A note when both qform and sform are set and disagree (readers differ on which to use)."""
    if int(img.header["qform_code"]) <= 0 or int(img.header["sform_code"]) <= 0:
        return ()
    try:
        disagree = not np.allclose(img.get_qform(), img.get_sform(), atol=1e-3)
        # nibabel and MONAI follow the sform, SimpleITK the qform: say which one we use.
        note = "qform and sform disagree; the sform was used (as nibabel and MONAI do; SimpleITK uses the qform)"
    except ValueError as err:  # a corrupt quaternion (nibabel: "w2 should be positive")
        disagree, note = True, f"the qform cannot be decoded ({err}); the sform was used"
    if disagree:
        logger.debug("%s: %s", path, note)
        return (note,)
    return ()


def _real_valued(array: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """``array`` as float32; complex voxels become their magnitude, said in a note (a bare
    cast would drop the imaginary part and only warn on stderr)."""
    if np.iscomplexobj(array):
        note = f"complex-valued voxels ({array.dtype}): their magnitude was used"
        return np.abs(array).astype(np.float32), (note,)
    return array.astype(np.float32, copy=False), ()


@dataclasses.dataclass(frozen=True)
class HeaderData:
    """Where the voxels of an NRRD/MetaImage header are: ``files`` it names (empty when the
    voxels follow the header in the same file), and whether they are ``raw`` (uncompressed
    binary, whose size can be checked against the header)."""

    files: tuple[Path, ...]
    raw: bool


def header_data(path: Path) -> HeaderData:
    """The data files named by the NRRD (``data file:``) or MetaImage (``ElementDataFile =``)
    header at ``path``; none for other files or headers that cannot be parsed."""
    try:
        with path.open("rb") as f:
            lines = f.read(_HEADER_BYTES).decode("latin-1").splitlines()
    except OSError:
        return HeaderData((), False)
    nrrd = bool(lines) and lines[0].startswith("NRRD")
    fields: dict[str, str] = {}
    for i, line in enumerate(lines[1:] if nrrd else lines, start=1 if nrrd else 0):
        if nrrd and not line.strip():
            break  # a blank line ends an NRRD header
        key, sep, value = line.partition(":" if nrrd else "=")
        if not sep or (nrrd and line.startswith("#")):
            continue
        key = key.strip().lower().replace(" ", "")
        fields[key] = value.strip()
        if key in ("datafile", "elementdatafile"):
            names = _data_names(value.strip(), lines[i + 1 :])
            # A NUL byte cannot be in a file name: such a header is corrupt; SimpleITK says so.
            files = tuple(path.parent / n for n in names if "\0" not in n)
            return HeaderData(files, _is_raw(fields, nrrd))
    return HeaderData((), _is_raw(fields, nrrd))


def _is_raw(fields: dict[str, str], nrrd: bool) -> bool:
    if nrrd:
        return fields.get("encoding", "").lower() == "raw"
    return fields.get("compresseddata", "false").lower() != "true"


def _data_names(value: str, following: list[str]) -> list[str]:
    """File names from a data-file field: one name, LOCAL (none), LIST (the lines after
    it), or a printf pattern with first, last and step numbers."""
    words = value.split()
    if not words or words[0].upper() == "LOCAL":
        return []
    if words[0].upper() == "LIST":
        return [line.strip() for line in following if line.strip()][:_MAX_DATA_FILES]
    if "%" in words[0] and len(words) >= 4:
        try:
            first, last, step = (int(w) for w in words[1:4])
            numbers = range(first, last + (1 if step > 0 else -1), step)
            return [words[0] % n for n in numbers[:_MAX_DATA_FILES]]
        except (ValueError, TypeError):
            return []
    return [value]


def _component_bytes(pixel_id: int) -> int:
    """Bytes per component of a SimpleITK pixel type ("vector of 16-bit ..." -> 2). A
    complex voxel counts as two components (real, imaginary) in SimpleITK's reader."""
    import SimpleITK as sitk

    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(pixel_id))
    return int(bits[1]) // 8 if bits else 1


def _read_itk(path: Path, limit: int, integers: bool = False) -> Volume:
    import SimpleITK as sitk

    data = header_data(path)
    missing = [p for p in data.files if not os.path.isfile(p)]  # False for over-long names too
    if missing:
        raise ScanError(
            path,
            f"names the data file {missing[0].name}, which is missing" + _more(missing),
            f"put {missing[0].name} beside {path.name} (the header names it), or re-export the scan",
        )
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_itk_header(path, reader, data, limit)
        img = reader.Execute()
    except RuntimeError as err:
        raise _unreadable_itk(path, err) from err
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    axes = direction * np.asarray(img.GetSpacing()[:3])[None, :]
    origin = np.asarray(img.GetOrigin()[:3])
    # A view of SimpleITK's buffer (no copy); converted slab by slab below.
    view = sitk.GetArrayViewFromImage(img)
    if view.dtype.kind == "c":
        array, notes = _real_valued(np.ascontiguousarray(_itk_channels_first(view, img)))
    else:
        keep = integers and view.dtype in COMPACT_TYPES  # SimpleITK has applied any scaling
        array, notes = _itk_slabs(_itk_channels_first(view, img), view.dtype if keep else _FLOAT32), ()
    del view, img  # SimpleITK's copy of the voxels goes now, before anything else is allocated
    geometry = grid(path, array.shape[1:], axes, origin)
    return Volume(array, geometry, path, notes=notes)


def _itk_channels_first(array: np.ndarray, img) -> np.ndarray:
    """SimpleITK's (t?, z, y, x, c?) array as a (c * t, x, y, z) view."""
    if img.GetNumberOfComponentsPerPixel() == 1:
        array = array[..., None]
    if img.GetDimension() == 4:
        array = np.moveaxis(array, 0, -2).reshape(*array.shape[1:4], -1)
    return np.transpose(array, (3, 2, 1, 0))


def _itk_slabs(view: np.ndarray, dtype: np.dtype = _FLOAT32) -> np.ndarray:
    """``view`` (C, X, Y, Z) of any real type as a new C-contiguous ``dtype`` array, converted
    a slab of slices at a time (never a second whole-volume temporary)."""
    out = np.empty(view.shape, dtype=dtype)
    step = _slab_slices((*view.shape[1:], view.shape[0]))
    for k in range(0, view.shape[3], step):
        out[..., k : k + step] = view[..., k : k + step]
    return out


def _check_itk_header(path: Path, reader, data: HeaderData, limit: int) -> None:
    """Dimensions, spacing and declared size from the header alone, before any voxel."""
    size = tuple(reader.GetSize())
    if len(size) < 3:
        raise _not_3d(path, size)
    if len(size) > 4:
        raise ScanError(path, f"has {len(size)} dimensions {size}", "medseg reads 3D scans (4D ones as channels)")
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)
    if not (np.isfinite(spacing).all() and spacing.min() > 0):
        raise _bad_spacing(path, spacing)
    components = reader.GetNumberOfComponents()
    check_voxel_count(path, (*size, components) if components > 1 else size, limit)
    declared = int(np.prod(size)) * components * _component_bytes(reader.GetPixelID())
    if data.raw:
        present = sum(p.stat().st_size for p in data.files) if data.files else path.stat().st_size
        _check_bytes(path, declared, present, "its data file(s) hold" if data.files else "it holds")
    elif path.suffix.lower() in (".mha", ".mhd"):
        _check_compressed_metaimage(path, data, declared)


def _check_compressed_metaimage(path: Path, data: HeaderData, declared: int) -> None:
    """Inflate a compressed MetaImage's voxel stream once, counting, none kept: SimpleITK
    reads a damaged one with "Uncompress failed" on stderr and returns wrong voxels, so the
    stream is checked here (zlib's own checksum, its end, and the size the header declares).
    Costs one more decompression, for compressed MetaImage files only. Per-slice data files
    (ElementDataFile = LIST or a pattern) are left to SimpleITK."""
    if len(data.files) > 1:
        return
    source, offset = (data.files[0], 0) if data.files else (path, _local_data_offset(path))
    if offset is None:
        return
    inflate, total = zlib.decompressobj(), 0
    try:
        with source.open("rb") as f:
            f.seek(offset)
            pending = b""
            while total <= declared and not inflate.eof:
                pending = pending or f.read(2**20)
                if not pending:
                    break
                total += len(inflate.decompress(pending, 2**24))  # bounded: a bomb inflates in steps
                pending = inflate.unconsumed_tail
    except zlib.error as err:
        raise _corrupt_stream(path, f"its compressed voxel data are corrupt (zlib: {err})") from err
    if not inflate.eof or total != declared:
        raise _corrupt_stream(
            path,
            f"its compressed voxel data inflate to {total:,}{'' if inflate.eof else '+ (unfinished)'} bytes "
            f"where the header declares {declared:,}",
        )


def _local_data_offset(path: Path) -> int | None:
    """Where the voxels of a MetaImage with ``ElementDataFile = LOCAL`` start: after that
    line, the header's last. None when the header has no such line."""
    with path.open("rb") as f:
        head = f.read(_HEADER_BYTES)
    found = re.search(rb"^[ \t]*ElementDataFile[ \t]*=[ \t]*LOCAL[ \t]*\r?\n", head, re.MULTILINE | re.IGNORECASE)
    return None if found is None else found.end()


def _corrupt_stream(path: Path, problem: str) -> ScanError:
    return ScanError(path, problem, "the file is truncated or corrupt; re-copy or re-export the scan")


def _unreadable_itk(path: Path, err: RuntimeError) -> ScanError:
    text = str(err).strip()
    return ScanError(
        path,
        f"cannot be read ({text.splitlines()[-1] if text else err})",
        "the file is truncated, corrupt or not an image; re-export or re-copy it",
    )


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _bad_spacing(path: Path, spacing: np.ndarray) -> ScanError:
    return ScanError(
        path,
        f"declares a voxel spacing of {tuple(round(float(s), 6) for s in spacing)} mm; spacing must be positive",
        "fix the voxel size in its header (pixdim/sform, ElementSpacing, space directions) or re-export the scan",
    )


def grid(path: Path, shape: tuple[int, ...], axes: np.ndarray, origin: np.ndarray) -> Geometry:
    """The Geometry of a grid of ``shape`` (x, y, z) whose voxel axes step by the columns of
    ``axes`` (3, 3) (LPS mm) from ``origin`` (3,) (LPS mm).

    Raises ScanError naming ``path`` for non-finite values, zero spacing, and sheared axes:
    one orthogonal grid cannot hold those, and writing it back would make qform != sform.
    """
    axes, origin = np.asarray(axes, dtype=np.float64), np.asarray(origin, dtype=np.float64)
    if not (np.isfinite(axes).all() and np.isfinite(origin).all()):
        raise ScanError(
            path,
            f"its voxel-to-world transform holds non-finite values ({np.round(axes, 4).tolist()}, "
            f"origin {np.round(origin, 4).tolist()})",
            "the header is corrupt; re-export the scan",
        )
    spacing = np.linalg.norm(axes, axis=0)
    if spacing.min() <= 0:
        raise _bad_spacing(path, spacing)
    direction = axes / spacing[None, :]
    cosines = np.abs(direction.T @ direction - np.eye(3))
    i, j = np.unravel_index(np.argmax(cosines), cosines.shape)
    if cosines[i, j] > _SHEAR_TOL:
        angle = np.degrees(np.arccos(np.clip(direction[:, i] @ direction[:, j], -1, 1)))
        raise ScanError(
            path,
            f"has sheared/skewed voxel axes: axes {'ijk'[i]} and {'ijk'[j]} meet at {angle:.4f} degrees, not 90",
            "resample it to an orthogonal grid first (for example with SimpleITK's Resample or FSL's flirt)",
        )
    return Geometry(
        shape=tuple(int(s) for s in shape[:3]),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
    )


def _not_3d(path: Path, shape: tuple[int, ...]) -> ScanError:
    return ScanError(
        path,
        f"is a 2D image (shape {tuple(shape)}), not a volume",
        "medseg segments 3D scans; stack the slices into one volume first",
    )


def checked(volume: Volume) -> Volume:
    """Refuse flat or empty volumes; replace scattered non-finite voxels with the minimum.

    Works in place on ``volume.array``, a slab at a time (no whole-volume mask).
    """
    path = volume.source
    if min(volume.geometry.shape) < 2:
        raise _not_3d(path, volume.geometry.shape)
    array = volume.array
    # min and max are NaN or infinite exactly when some voxel is: two passes, no mask.
    if np.isfinite(array.min()) and np.isfinite(array.max()):
        return volume
    step = _slab_slices((*array.shape[1:], array.shape[0]), array.itemsize)
    slabs = [array[..., k : k + step] for k in range(0, array.shape[3], step)]
    bad, lowest = 0, np.inf
    for slab in slabs:
        finite = np.isfinite(slab)
        bad += int(finite.size - np.count_nonzero(finite))
        if finite.any():
            lowest = min(lowest, slab[finite].min())
    if bad == array.size:
        raise ScanError(
            path,
            "holds no finite intensity: every voxel is NaN or infinite",
            "the scan is empty or was written wrongly; re-export it",
        )
    note = f"{bad} NaN/infinite voxel(s) ({100 * bad / array.size:.2g}%) set to the volume minimum"
    logger.debug("%s: %s", path, note)
    for slab in slabs:
        np.copyto(slab, lowest, where=~np.isfinite(slab))
    return dataclasses.replace(volume, notes=(*volume.notes, note))
