"""MONAI's Orientation without a second copy of the volume: flips in place, axes as a view.

MONAI's ``Orientation`` returns ``torch.flip(img)`` (a new tensor the size of the volume)
then permutes it. :class:`OrientationInPlace` does the same flips on the input's own
memory, block by block, and the same permutation as a view, and records the very operation
MONAI records, so MONAI's ``inverse`` (``Compose.inverse``, ``Invertd``) undoes it as before.
The result is the same tensor, bit for bit and stride for stride, as MONAI's; only the input
is consumed. Use it where the caller owns the input (inference builds it with
``build_transforms(..., inplace=True)`` on voxels it read itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import Orientation, Orientationd
from monai.transforms.inverse import TraceableTransform
from monai.utils import SpaceKeys

# Bytes moved per step of an in-place flip: the step's temporaries are three such blocks.
_BLOCK_BYTES = 8 * 2**20
# MONAI's axis labels for LPS-space tensors (``Orientation.__call__``).
_LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))


def flip_(tensor: torch.Tensor, dims: Sequence[int], block_bytes: int = _BLOCK_BYTES) -> torch.Tensor:
    """Reverse ``tensor`` along each of ``dims`` in place and return it: the values (and
    strides) ``torch.flip(tensor, dims)`` would give, with temporaries of a few blocks of
    about ``block_bytes`` instead of a second tensor. The two ends swap, block by block."""
    for dim in dims:
        n = int(tensor.shape[dim])
        per_index = tensor.numel() // max(1, n) * tensor.element_size()
        step = max(1, block_bytes // max(1, per_index))
        for start in range(0, n // 2, step):
            k = min(step, n // 2 - start)
            low, high = tensor.narrow(dim, start, k), tensor.narrow(dim, n - start - k, k)
            saved = low.clone()
            low.copy_(high.flip(dim))
            high.copy_(saved.flip(dim))
    return tensor


class OrientationInPlace(Orientation):
    """``monai.transforms.Orientation`` that reorients its (C, X, Y, Z) input in place.

    Same arguments, same output, same recorded operation and same ``inverse`` as MONAI's;
    the input's voxels are overwritten (the output shares them). Lazy calls, inputs with
    pending operations and plain tensors go to MONAI's own code unchanged.
    """

    def __call__(self, data_array: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:
        lazy_ = self.lazy if lazy is None else lazy
        if lazy_ or not isinstance(data_array, MetaTensor) or data_array.pending_operations:
            return super().__call__(data_array, lazy=lazy)
        affine = np.asarray(data_array.affine, dtype=np.float64)
        return _orient_in_place(data_array, affine, self._spatial_ornt(data_array, affine), self.get_transform_info())

    def _spatial_ornt(self, img: MetaTensor, affine: np.ndarray) -> np.ndarray:
        """The nibabel orientation change MONAI's ``Orientation.__call__`` computes."""
        spatial = img.ndim - 1
        src = nib.io_orientation(to_affine_nd(spatial, affine))
        if self.as_closest_canonical:
            return src
        labels = self.labels
        if labels is None and "space" in img.meta and SpaceKeys(img.meta["space"]) == SpaceKeys.LPS:
            labels = _LPS_LABELS
        if self.axcodes is None or len(self.axcodes) < spatial:
            raise ValueError(f"axcodes must match the input spatially, got axcodes={self.axcodes} for {spatial}D")
        dst = nib.orientations.axcodes2ornt(self.axcodes[:spatial], labels=labels)
        return nib.orientations.ornt_transform(src, dst)


def _orient_in_place(img: MetaTensor, affine: np.ndarray, spatial_ornt: np.ndarray, transform_info: dict) -> MetaTensor:
    """``monai.transforms.spatial.functional.orientation`` (eager) with an in-place flip."""
    spatial_shape = tuple(int(s) for s in img.shape[1:])
    xform = nib.orientations.inv_ornt_aff(spatial_ornt, spatial_shape)
    ornt = np.array(spatial_ornt, dtype=np.float64)
    ornt[:, 0] += 1
    ornt = np.vstack([[0, 1], ornt])  # the channel axis stays first
    flips = [axis for axis, direction in enumerate(ornt[:, 1]) if direction == -1]
    transpose = np.argsort(ornt[:, 0])
    meta = TraceableTransform.track_transform_meta(
        img,
        sp_size=np.asarray(spatial_shape)[[i - 1 for i in transpose if i > 0]],
        affine=xform,
        extra_info={"original_affine": affine},
        orig_size=spatial_shape,
        transform_info=transform_info,
        lazy=False,
    )
    out = flip_(img.as_tensor(), flips)
    if not np.array_equal(transpose, np.arange(img.ndim)):
        out = out.permute(transpose.tolist())  # a view: strides as MONAI's permuted result
    return MetaTensor(out).copy_meta_from(meta)


class OrientationInPlaced(Orientationd):
    """Dictionary version of :class:`OrientationInPlace` (``monai.transforms.Orientationd``'s
    arguments)."""

    def __init__(
        self,
        keys: KeysCollection,
        axcodes: str | None = None,
        as_closest_canonical: bool = False,
        labels: Sequence[tuple[str, str]] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, axcodes, as_closest_canonical, labels, allow_missing_keys)
        self.ornt_transform = OrientationInPlace(axcodes, as_closest_canonical, labels)
