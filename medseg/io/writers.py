"""Writers: label maps back onto a scan's original grid.

NIfTI is written with nibabel so both transforms are under our control: identical qform and
sform, both with code 1 (scanner), because SimpleITK follows the qform and nibabel the sform
and any difference between them shows up as misaligned masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.io.files import atomic_path
from medseg.io.volume import Geometry

NIFTI_XFORM_SCANNER_ANAT = 1


def label_dtype(max_value: int) -> type[np.integer]:
    """The smallest unsigned type for label values up to ``max_value``."""
    return np.uint8 if max_value <= np.iinfo(np.uint8).max else np.uint16


def write_nifti_labels(labels: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write ``labels`` (X, Y, Z) integers to ``path`` (.nii.gz) on ``geometry``'s grid."""
    import nibabel as nib

    if tuple(labels.shape) != tuple(geometry.shape):
        raise ValueError(f"labels {labels.shape} do not match the grid {geometry.shape}")
    data = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
    affine = geometry.affine_ras()
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=NIFTI_XFORM_SCANNER_ANAT)
    img.set_sform(affine, code=NIFTI_XFORM_SCANNER_ANAT)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_intent("label")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
