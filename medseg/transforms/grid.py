"""Grid changes: the slice axis, and in-plane resampling that records its inverse.

In-plane resampling keeps the field of view (``align_corners=False``: the outer pixel edges
stay where they are), changes only the two in-plane axes and leaves the slice axis alone.
Both directions live in :class:`InPlaneResampling`. Because it never mixes slices, it can
be applied slice batch by slice batch, which is what the predictor does (images forward,
class probabilities back); whole volumes go through :class:`ResampleInPlane`, whose inverse
MONAI's ``Compose.inverse`` replays. A test holds the two paths equal.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.utils import TraceKeys, look_up_option

_PLANE_CODES = {"sagittal": ("L", "R"), "coronal": ("A", "P"), "axial": ("S", "I")}
RESAMPLE_MODES = ("bilinear", "nearest")


def spacing_from_affine(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """(3,) voxel spacing (mm) of a (4, 4) affine."""
    a = np.asarray(affine, dtype=np.float64)
    return np.linalg.norm(a[:3, :3], axis=0)


def slice_axis_index(rule: str, affine: np.ndarray | torch.Tensor) -> int:
    """The voxel axis (0, 1 or 2) that ``rule`` slices along for a grid with RAS ``affine``.

    "axial", "coronal" and "sagittal" pick the voxel axis closest to that plane's normal, so
    the answer does not depend on how the file stores the scan; "coarsest" picks the axis
    with the largest spacing (ties go to the later axis, axial in RAS orientation).
    """
    a = np.asarray(affine, dtype=np.float64)
    if rule == "coarsest":
        spacing = spacing_from_affine(a)
        return int(2 - np.argmax(spacing[::-1] > spacing.max() * (1 - 1e-3)))
    codes = nib.orientations.aff2axcodes(a)
    wanted = _PLANE_CODES[rule]
    return next(i for i, code in enumerate(codes) if code in wanted)


def in_plane_axes(slice_axis: int) -> tuple[int, int]:
    """The two voxel axes of a slice, in increasing order."""
    return tuple(a for a in range(3) if a != slice_axis)  # type: ignore[return-value]


def target_size(
    size: tuple[int, int], spacing: tuple[float, float], target: tuple[float, float] | None
) -> tuple[int, int]:
    """In-plane size after resampling from ``spacing`` to ``target`` mm (None: unchanged)."""
    if target is None:
        return (int(size[0]), int(size[1]))
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(size, spacing, target))  # type: ignore[return-value]


def resample_slices(slices: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample a batch of slices (N, C, H, W) to (N, C, *size), keeping the field of view.

    ``mode`` "bilinear" for intensities and probabilities, "nearest" for label maps.
    Downsampling with bilinear uses antialiasing so thin structures are averaged, not skipped.
    """
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    if mode == "nearest":
        return F.interpolate(slices, size=size, mode="nearest-exact")
    shrink = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
    out = F.interpolate(slices.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.to(slices.dtype) if slices.dtype.is_floating_point else out


def _index_map(slice_axis: int, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(4, 4) map from new voxel indices to old ones for a field-of-view keeping resample."""
    xform = torch.eye(4, dtype=torch.float64)
    for axis, n_old, n_new in zip(in_plane_axes(slice_axis), old, new):
        scale = n_old / n_new
        xform[axis, axis] = scale
        xform[axis, 3] = 0.5 * scale - 0.5
    return xform


@dataclass(frozen=True)
class InPlaneResampling:
    """In-plane resampling between a scan's ``native`` slice size and the model's ``resized``
    one, both directions, keeping the field of view; the slice axis is never touched.

    The one implementation of this grid change: :class:`ResampleInPlane` applies it to whole
    volumes (and undoes it through MONAI's ``Compose.inverse``), and the predictor applies
    it to slice batches, the forward direction to the images and ``inverse`` to the class
    probabilities. Since it never mixes slices, batch by batch equals whole volume.
    """

    native: tuple[int, int]
    resized: tuple[int, int]

    @classmethod
    def to_spacing(
        cls, native: tuple[int, int], spacing: tuple[float, float], target: tuple[float, float] | None
    ) -> InPlaneResampling:
        """From slices of ``native`` size at ``spacing`` mm to ``target`` mm (None: none)."""
        return cls((int(native[0]), int(native[1])), target_size(native, spacing, target))

    @property
    def identity(self) -> bool:
        return self.native == self.resized

    def forward(self, slices: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(N, C, *native) -> (N, C, *resized)."""
        return resample_slices(slices, self.resized, mode)

    def inverse(self, slices: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(N, C, *resized) -> (N, C, *native): images, probabilities ("bilinear") or
        label maps ("nearest") back on the native grid."""
        return resample_slices(slices, self.native, mode)

    def volume(self, img: torch.Tensor, slice_axis: int, mode: str, inverse: bool = False) -> torch.Tensor:
        """(C, X, Y, Z) with the in-plane axes around ``slice_axis`` resampled (or restored)."""
        # Bring the slice axis forward: (C, ...) -> (S, C, H, W), then back.
        moved = torch.movedim(torch.as_tensor(img), slice_axis + 1, 0)
        out = self.inverse(moved, mode) if inverse else self.forward(moved, mode)
        return torch.movedim(out, 0, slice_axis + 1)

    def index_map(self, slice_axis: int) -> torch.Tensor:
        """(4, 4) map from resized voxel indices to native ones (for the affine)."""
        return _index_map(slice_axis, self.native, self.resized)


class ResampleInPlane(InvertibleTransform, Transform):
    """Resample the two in-plane axes of (C, X, Y, Z) to ``spacing`` mm; the slice axis is kept.

    The slice axis comes from ``slice_axis_rule`` and the image's affine (see
    :func:`slice_axis_index`). The affine is updated and the original in-plane size recorded,
    so ``inverse`` (MONAI's ``Compose.inverse`` / ``Invertd``) restores the grid.

    ``mode`` ("bilinear" or "nearest") is recorded in the applied operation's ``extra_info``
    under "mode", where MONAI's spatial transforms keep theirs, so ``Invertd(...,
    nearest_interp=True)`` (which rewrites every recorded "mode" to "nearest") turns the
    inverse into nearest neighbour, as it does for ``Spacingd``.
    """

    def __init__(self, spacing: tuple[float, float] | None, slice_axis_rule: str, mode: str = "bilinear") -> None:
        # None keeps the native spacing (the grid is unchanged, the operation still recorded):
        # one configuration serves models with and without a target spacing.
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.slice_axis_rule = slice_axis_rule
        self.mode = look_up_option(mode, RESAMPLE_MODES)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = img if isinstance(img, MetaTensor) else MetaTensor(img)
        axis = slice_axis_index(self.slice_axis_rule, img.affine)
        plane = in_plane_axes(axis)
        spacing = spacing_from_affine(img.affine)
        grid = InPlaneResampling.to_spacing(
            tuple(int(img.shape[1 + a]) for a in plane), tuple(spacing[a] for a in plane), self.spacing
        )
        sp_size = [int(s) for s in img.shape[1:]]
        for a, n in zip(plane, grid.resized):
            sp_size[a] = n
        meta = self.track_transform_meta(
            img,
            sp_size=sp_size,
            affine=grid.index_map(axis),
            extra_info={"slice_axis": axis, "mode": self.mode},
            orig_size=tuple(int(s) for s in img.shape[1:]),
            transform_info=self.get_transform_info(),
        )
        out = MetaTensor(grid.volume(img.as_tensor(), axis, self.mode))
        return out.copy_meta_from(meta)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Back to the recorded grid with the recorded mode (which ``Invertd(...,
        nearest_interp=True)`` sets to "nearest"); label maps (integer dtype) always use
        nearest neighbour."""
        record = self.pop_transform(data)
        extra = record[TraceKeys.EXTRA_INFO]
        axis = int(extra["slice_axis"])
        orig = [int(s) for s in record[TraceKeys.ORIG_SIZE]]
        plane = in_plane_axes(axis)
        grid = InPlaneResampling(tuple(orig[a] for a in plane), tuple(int(data.shape[1 + a]) for a in plane))
        mode = look_up_option(str(extra["mode"]), RESAMPLE_MODES) if data.dtype.is_floating_point else "nearest"
        out = MetaTensor(grid.volume(data.as_tensor(), axis, mode, inverse=True))
        out.copy_meta_from(data)
        out.affine = data.affine @ torch.linalg.inv(grid.index_map(axis))
        return out


class ResampleInPlaned(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ResampleInPlane`."""

    def __init__(
        self,
        keys: KeysCollection,
        spacing: tuple[float, float] | None,
        slice_axis_rule: str,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resampler = ResampleInPlane(spacing, slice_axis_rule, mode)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d
