"""Read one NIfTI, NRRD or MHA/MHD file into a Volume (DICOM series: ``medseg.io.dicom``).

Readers return arrays (C, X, Y, Z) float32 with LPS geometry and refuse, with a ScanError
naming the file, anything that is not a 3D scan with finite intensities.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from medseg.errors import ScanError
from medseg.io.volume import Geometry, Volume

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def scan_suffix(path: Path) -> str | None:
    """The scan-format suffix of ``path`` (lower case), or None if it has none."""
    name = path.name.lower()
    return next((s for s in SCAN_SUFFIXES if name.endswith(s)), None)


def scan_name(path: Path) -> str:
    """``path``'s name without its scan suffix (a DICOM folder keeps its name)."""
    suffix = scan_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def read_file(path: Path) -> Volume:
    """Read the NIfTI/NRRD/MHA file at ``path`` (chosen by suffix) into a checked Volume.

    Scans are opened through ``medseg.io.read_scan`` (discovery decides what a path holds,
    DICOM included); this is the file-format step underneath it.
    Raises ScanError naming the file, what is wrong and what to do.
    """
    suffix = scan_suffix(path)
    if suffix is None:
        raise ScanError(path, "has no NIfTI/NRRD/MHA suffix", "give a .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd file")
    if path.stat().st_size == 0:
        raise ScanError(path, "is empty (0 bytes)", "the copy or download did not finish")
    volume = _read_nifti(path) if suffix in NIFTI_SUFFIXES else _read_itk(path)
    return checked(volume)


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error, OSError...
        raise ScanError(
            path,
            f"cannot be read as NIfTI ({type(err).__name__}: {err})",
            "the file is truncated, corrupt or not a NIfTI image; re-export or re-copy it",
        ) from err
    header = img.header
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    notes = ()
    if qcode > 0 and scode > 0 and not np.allclose(img.get_qform(), img.get_sform(), atol=1e-3):
        # nibabel and MONAI follow the sform, SimpleITK the qform: say which one we use.
        notes = ("qform and sform disagree; the sform was used (as nibabel and MONAI do; SimpleITK uses the qform)",)
        logger.debug("%s: %s", path, notes[0])
    spatial = array.shape[:3]
    # Dimensions past the third (time, vector components) become channels.
    array = array.reshape(*spatial, -1) if array.ndim > 3 else array[..., None]
    if array.ndim < 4 or len(spatial) < 3:
        raise _not_3d(path, img.shape)
    geometry = Geometry.from_affine_ras(img.affine, spatial)
    return Volume(np.ascontiguousarray(np.moveaxis(array, -1, 0)), geometry, path, notes=notes)


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ScanError(
            path,
            f"cannot be read ({str(err).strip().splitlines()[-1] if str(err).strip() else err})",
            "the file is truncated, corrupt or not an image; re-export or re-copy it",
        ) from err
    dim = img.GetDimension()
    if dim < 3:
        raise _not_3d(path, img.GetSize())
    array = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    if img.GetNumberOfComponentsPerPixel() == 1:
        array = array[..., None]
    # SimpleITK: (t?, z, y, x, c) -> (c * t, x, y, z)
    if dim == 4:
        array = np.moveaxis(array, 0, -2).reshape(*array.shape[1:4], -1)
    array = np.transpose(array, (3, 2, 1, 0))
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    geometry = Geometry(
        shape=tuple(array.shape[1:]),
        spacing=tuple(img.GetSpacing()[:3]),
        origin=tuple(img.GetOrigin()[:3]),
        direction=tuple(direction.ravel()),
    )
    return Volume(np.ascontiguousarray(array), geometry, path)


def _not_3d(path: Path, shape: tuple[int, ...]) -> ScanError:
    return ScanError(
        path,
        f"is a 2D image (shape {tuple(shape)}), not a volume",
        "medseg segments 3D scans; stack the slices into one volume first",
    )


def checked(volume: Volume) -> Volume:
    """Refuse flat or empty volumes; replace scattered non-finite voxels with the minimum."""
    path = volume.source
    if min(volume.geometry.shape) < 2:
        raise _not_3d(path, volume.geometry.shape)
    finite = np.isfinite(volume.array)
    if not finite.all():
        bad = int(finite.size - finite.sum())
        if bad == finite.size:
            raise ScanError(
                path,
                "holds no finite intensity: every voxel is NaN or infinite",
                "the scan is empty or was written wrongly; re-export it",
            )
        note = f"{bad} NaN/infinite voxel(s) ({100 * bad / finite.size:.2g}%) set to the volume minimum"
        logger.debug("%s: %s", path, note)
        np.copyto(volume.array, volume.array[finite].min(), where=~finite)
        volume = dataclasses.replace(volume, notes=(*volume.notes, note))
    return volume
