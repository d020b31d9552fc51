"""Quality-control pictures: a PNG montage of one scan with its labels overlaid.

Axial slices through the segmented region, shown the same way for every input orientation
(radiological view), with a legend of the label names and colours.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.io.files import atomic_path
from medseg.io.volume import Volume
from medseg.spec import LabelSpec

N_SLICES = 6


def _canonical(array: np.ndarray, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) flipped/permuted to RAS so slices display the same way for every
    input orientation (no interpolation), and the (3,) voxel sizes of that layout."""
    affine = volume.geometry.affine_ras()
    ornt = nib.orientations.io_orientation(affine)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.geometry.shape)
    return nib.orientations.apply_orientation(array, ornt), nib.affines.voxel_sizes(canonical_affine)


def write_montage(volume: Volume, labels: np.ndarray, spec_labels: tuple[LabelSpec, ...], path: Path) -> Path:
    """Axial slices through the segmented region with the labels overlaid, and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, sizes = _canonical(volume.array[0], volume)
    mask, _ = _canonical(labels, volume)
    with_labels = np.flatnonzero(mask.any(axis=(0, 1)))
    pool = with_labels if with_labels.size else np.arange(mask.shape[2])
    picks = np.unique(pool[np.linspace(0, len(pool) - 1, min(N_SLICES, len(pool))).round().astype(int)])
    lo, hi = np.percentile(image, (1, 99))
    colors = np.zeros((256, 4))
    for lab in spec_labels:
        if lab.value:
            colors[lab.value] = [*(c / 255 for c in lab.color), 0.45]
    fig, axes = plt.subplots(1, len(picks), figsize=(2.4 * len(picks), 2.8), squeeze=False)
    for ax, k in zip(axes[0], picks):
        # RAS arrays: the (x, y) slice flipped on both axes and transposed puts anterior at the top and the
        # patient's right on the left of the picture (the radiological convention).
        ax.imshow(np.flip(image[:, :, k], (0, 1)).T, cmap="gray", vmin=lo, vmax=hi, aspect=sizes[1] / sizes[0])
        ax.imshow(
            np.flip(colors[mask[:, :, k]], (0, 1)).transpose(1, 0, 2),
            aspect=sizes[1] / sizes[0],
            interpolation="nearest",
        )
        ax.set_title(f"axial {k}", fontsize=8)
        ax.axis("off")
    handles = [Patch(color=np.array(lab.color) / 255, label=lab.name) for lab in spec_labels if lab.value]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
