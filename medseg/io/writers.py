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
from medseg.spec import LabelSpec

NIFTI_XFORM_SCANNER_ANAT = 1
# Voxels compared at a time when finding a segment's extent (a few dozen 512x512 slices).
_SLAB_VOXELS = 2**23


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


def write_color_table(labels: tuple[LabelSpec, ...], path: Path) -> Path:
    """A 3D Slicer colour table (``.ctbl``: ``index name R G B A`` per line), which every
    Slicer version loads; background is transparent. Load it with the NIfTI in Slicer and
    pick it as the label map's colour node to see names and colours."""
    lines = [f"# medseg colour table: {len(labels)} labels", "# index name R G B A"]
    for lab in labels:
        alpha = 0 if lab.value == 0 else 255
        lines.append(f"{lab.value} {lab.name.replace(' ', '_')} {lab.color[0]} {lab.color[1]} {lab.color[2]} {alpha}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _extent(labels: np.ndarray, value: int) -> list[int]:
    """Slicer's segment extent [i0, i1, j0, j1, k0, k1] of ``labels == value`` (X, Y, Z);
    [0, -1, ...] when absent. Works a slab of i at a time (no whole-volume mask per label)."""
    along_i = np.zeros(labels.shape[0], dtype=bool)
    plane = np.zeros(labels.shape[1:], dtype=bool)  # (j, k): the label somewhere along i
    step = max(1, _SLAB_VOXELS // max(1, plane.size))
    for i in range(0, labels.shape[0], step):
        mask = labels[i : i + step] == value
        along_i[i : i + step] = mask.any(axis=(1, 2))
        plane |= mask.any(axis=0)
    if not along_i.any():
        return [0, -1, 0, -1, 0, -1]
    out = []
    for present in (along_i, plane.any(axis=1), plane.any(axis=0)):
        indices = np.flatnonzero(present)
        out += [int(indices[0]), int(indices[-1])]
    return out


def write_seg_nrrd(labels: np.ndarray, geometry: Geometry, spec_labels: tuple[LabelSpec, ...], path: Path) -> Path:
    """Write ``labels`` (X, Y, Z) as a 3D Slicer segmentation (``.seg.nrrd``) via slicerio.

    One shared layer; every segment gets ID, name, colour (0..1 floats, as Slicer stores
    them), label value, layer and extent, so Slicer never guesses (see dicom-seg.md #9).
    """
    import slicerio

    data = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
    segments = [
        {
            "id": f"Segment_{lab.value}",
            "name": lab.name,
            "color": [c / 255 for c in lab.color],
            "labelValue": lab.value,
            "layer": 0,
            "extent": _extent(data, lab.value),
        }
        for lab in spec_labels
        if lab.value != 0
    ]
    segmentation = {
        "voxels": data,
        "ijkToLPS": geometry.affine_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
    return path


PROBABILITY_ENCODINGS = ("uint8", "float32")


def write_probability_map(probability: np.ndarray, geometry: Geometry, path: Path, encoding: str = "uint8") -> Path:
    """One class's probabilities (X, Y, Z) in [0, 1] as NIfTI on ``geometry``'s grid.

    "uint8" stores round(p * 255) with scl_slope 1/255, so every NIfTI reader returns
    probabilities in [0, 1] from a quarter of the float32 size (NIfTI-1 has no float16).
    """
    import nibabel as nib

    if encoding not in PROBABILITY_ENCODINGS:
        raise ValueError(f"probability encoding must be one of {PROBABILITY_ENCODINGS}, got {encoding!r}")
    affine = geometry.affine_ras()
    if encoding == "uint8":
        data = np.rint(np.clip(probability, 0, 1) * 255).astype(np.uint8)
        img = nib.Nifti1Image(data, affine)
        img.header.set_slope_inter(1 / 255, 0)
    else:
        img = nib.Nifti1Image(probability.astype(np.float32), affine)
    img.set_qform(affine, code=NIFTI_XFORM_SCANNER_ANAT)
    img.set_sform(affine, code=NIFTI_XFORM_SCANNER_ANAT)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
