"""Voxels and the geometry that places them in the world, travelling together.

Conventions (one per concept, used everywhere in medseg):

* Arrays are indexed ``(x, y, z)`` = ``(i, j, k)``, i fastest in the file, as nibabel, MONAI
  and slicerio do. SimpleITK arrays are ``(z, y, x)`` and are transposed at the boundary.
* ``Geometry`` stores spacing, origin and direction in DICOM/ITK patient coordinates (LPS),
  as SimpleITK, DICOM, NRRD and MHA do; ``affine_ras`` gives the nibabel/MONAI view.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# Flips x and y: LPS <-> RAS (its own inverse).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """The grid of a 3D scan: voxel counts, spacing (mm), origin (mm, LPS), direction (LPS).

    ``direction`` is a 3x3 matrix whose columns are the world (LPS) directions of the
    voxel axes i, j, k, stored row-major as a 9-tuple (SimpleITK's ``GetDirection`` order).
    ``origin`` is the world position of the centre of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError(f"Geometry needs 3 axes, got shape={self.shape}")
        if len(self.direction) != 9:
            raise ValueError(f"Geometry direction needs 9 values, got {len(self.direction)}")
        if min(self.spacing) <= 0:
            raise ValueError(f"Geometry spacing must be positive, got {self.spacing}")

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64; column c is the LPS direction of voxel axis c."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def affine_lps(self) -> np.ndarray:
        """(4, 4) float64 voxel index -> LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """(4, 4) float64 voxel index -> RAS mm (nibabel's and MONAI's affine)."""
        return _LPS_TO_RAS @ self.affine_lps()

    @classmethod
    def from_affine_ras(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """The geometry of a voxel grid of ``shape`` (x, y, z) with RAS ``affine`` (4, 4)."""
        lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing[None, :]
        return cls(
            shape=tuple(int(s) for s in shape[:3]),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in lps[:3, 3]),
            direction=tuple(float(d) for d in direction.ravel()),
        )

    def mismatch(self, other: Geometry, atol: float = 1e-4) -> str | None:
        """A sentence saying how ``other`` differs from this grid, or None when they agree."""
        if tuple(self.shape) != tuple(other.shape):
            return f"shape {other.shape} != {self.shape}"
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(a, b, rtol=0, atol=atol):
                return f"{name} {tuple(np.round(b, 6))} != {tuple(np.round(a, 6))}"
        return None


@dataclass(frozen=True)
class Volume:
    """A scan as read from disk: ``array`` (C, X, Y, Z) float32 on ``geometry``'s grid.

    ``source`` is the file or DICOM series folder it came from; ``description`` is a short
    human label (DICOM series description, or empty); ``notes`` are what the reader changed
    or doubts (replaced NaNs, a qform/sform disagreement...), which run reports show as
    warnings of the scan.
    """

    array: np.ndarray
    geometry: Geometry
    source: Path
    description: str = ""
    notes: tuple[str, ...] = ()  # what reading changed or doubted (NaNs replaced...): the record's warnings

    def __post_init__(self) -> None:
        if self.array.ndim != 4 or tuple(self.array.shape[1:]) != tuple(self.geometry.shape):
            raise ValueError(f"Volume array must be (C, *{self.geometry.shape}), got {self.array.shape}")

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    def without_voxels(self) -> Volume:
        """This volume with its voxels let go: ``array`` becomes a read-only stand-in of the
        same shape that takes no memory (zeros, stride 0), for what needs only the geometry,
        source and notes after the voxels went to the network (run records, label writers)."""
        stand_in = np.broadcast_to(np.zeros((), dtype=self.array.dtype), self.array.shape)
        return replace(self, array=stand_in)
