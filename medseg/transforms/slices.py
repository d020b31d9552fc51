"""2D slices cut from 3D volumes, for training (a seeded MONAI sampler) and inference.

``slice_stack`` is the one function that turns a volume into network input, so training
and inference see the same slices, in-plane orientation and context channels; ``pad_slices``
pads them to the model's window (centred, with the volume's minimum) and :class:`PadInPlane`
does the same to a whole volume, recording its inverse, before :class:`RandSliceSamplerd`
cuts it in a MONAI pipeline.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Pad, Randomizable
from monai.transforms.inverse import InvertibleTransform, TraceableTransform
from monai.transforms.traits import MultiSampleTrait

from medseg.transforms.grid import in_plane_axes, slice_axis_index


def slice_stack(
    image: torch.Tensor, axis: int, indices: Sequence[int] | torch.Tensor, context: int = 0
) -> torch.Tensor:
    """Slices ``indices`` along voxel ``axis`` of ``image`` (C, X, Y, Z) -> (N, C*(2k+1), H, W).

    With ``context`` k > 0 each slice brings its k neighbours on either side as extra
    channels (ordered from lower to higher index, channel-major), repeating the edge slice
    beyond the volume (2.5D input). H and W are the remaining voxel axes in increasing order.
    """
    volume = torch.movedim(torch.as_tensor(image), axis + 1, 0)  # (S, C, H, W) view
    idx = torch.as_tensor(indices, dtype=torch.long)
    if context == 0:
        return volume[idx]
    offsets = torch.arange(-context, context + 1)
    neighbours = (idx[:, None] + offsets[None, :]).clamp(0, volume.shape[0] - 1)  # (N, 2k+1)
    stacked = volume[neighbours]  # (N, 2k+1, C, H, W)
    return stacked.transpose(1, 2).reshape(len(idx), -1, *volume.shape[-2:])


def pad_slices(x: torch.Tensor, size: tuple[int, int], value: float) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Pad (N, C, H, W) evenly on both sides to at least ``size`` with ``value``.

    Training pads every slice to the model's window this way and inference pads whole slices
    the same way, so the network sees the same context at both. Returns the padded tensor and
    the (rows, columns) slices that crop it back.
    """
    h, w = x.shape[-2:]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    top, left = ph // 2, pw // 2
    if ph or pw:
        x = torch.nn.functional.pad(x, (left, pw - left, top, ph - top), value=value)
    return x, (slice(top, top + h), slice(left, left + w))


def slice_affine(affine: np.ndarray | torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """(3, 3) affine of slice ``index`` along voxel ``axis`` of a grid with (4, 4) ``affine``.

    The rows and columns of the two in-plane axes (in increasing order, as :func:`slice_stack`
    lays them out) and, as origin, the in-plane world coordinates of the slice's first voxel.
    Exact for a RAS-oriented grid whose slice axis is a world axis; for an oblique grid it is
    the slice's projection onto those two world axes.
    """
    a = torch.as_tensor(affine, dtype=torch.float64)
    plane = list(in_plane_axes(axis))
    origin = a[:3, 3] + a[:3, axis] * index
    out = torch.eye(3, dtype=torch.float64)
    out[:2, :2] = a[plane][:, plane]
    out[:2, 2] = origin[plane]
    return out


class PadInPlane(Pad):
    """Pad the two in-plane axes of (C, X, Y, Z) to at least ``window``, centred, with ``value``.

    What medseg does to every slice before the network, in training and inference (see
    :func:`pad_slices`): the extra pixels go ``d // 2`` before and the rest after, filled with
    the volume's minimum (``value=None``, the intensity of air after the preset) or a fixed
    ``value`` (0 for label maps). The slice axis is never padded. The padding is recorded as
    MONAI's ``Pad`` records it, so ``Compose.inverse`` / ``Invertd`` crop it off again.
    """

    def __init__(self, window: tuple[int, int], slice_axis_rule: str, value: float | None = None) -> None:
        super().__init__(mode="constant")
        self.window = (int(window[0]), int(window[1]))
        self.slice_axis_rule = slice_axis_rule
        self.value = value

    def __call__(self, img: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:  # type: ignore[override]
        img = img if isinstance(img, MetaTensor) else MetaTensor(img)
        axis = slice_axis_index(self.slice_axis_rule, img.affine)
        to_pad = [(0, 0), (0, 0), (0, 0), (0, 0)]  # channel, X, Y, Z
        for a, size in zip(in_plane_axes(axis), self.window):
            extra = max(0, size - int(img.shape[1 + a]))
            to_pad[1 + a] = (extra // 2, extra - extra // 2)
        value = float(img.min()) if self.value is None else float(self.value)
        return super().__call__(img, to_pad=tuple(to_pad), lazy=lazy, value=value)


class PadInPlaned(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`PadInPlane`: images keep ``value=None`` (their minimum),
    label maps take ``value=0``."""

    def __init__(
        self,
        keys: KeysCollection,
        window: tuple[int, int],
        slice_axis_rule: str,
        value: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.padder = PadInPlane(window, slice_axis_rule, value)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.padder(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.padder.inverse(d[key])
        return d


class RandSliceSamplerd(Randomizable, MapTransform, TraceableTransform, MultiSampleTrait):
    """Sample ``num_samples`` 2D slices from 3D (C, X, Y, Z) data along the model's slice axis.

    A fraction ``pos_fraction`` of the samples comes from slices whose ``label_key`` holds
    foreground (oversampling the structures to learn), the rest from all slices. Images get
    ``context`` neighbouring slices as channels; label maps never do. Returns a list of
    ``num_samples`` dicts, like MONAI's ``RandCropByPosNegLabeld``: each a shallow copy of the
    input with every key in ``keys`` replaced by a (C', H, W) MetaTensor and the chosen
    ``slice_index`` added. H and W are the remaining voxel axes in increasing order.

    Each slice carries the (3, 3) affine of its in-plane axes (:func:`slice_affine`, origin at
    the slice) and records the cut in its ``applied_operations`` (``extra_info`` holds
    ``slice_axis``, ``slice_index`` and ``context``). The cut is not invertible: a slice
    cannot be put back into a volume it no longer knows. The outputs collate with MONAI's
    ``list_data_collate``. Seed it with ``set_random_state`` (MONAI's DataLoader does this per
    worker).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        slice_axis_rule: str,
        num_samples: int = 8,
        pos_fraction: float = 0.5,
        context: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be within [0, 1], got {pos_fraction}")
        self.label_key = label_key
        self.slice_axis_rule = slice_axis_rule
        self.num_samples = num_samples
        self.pos_fraction = pos_fraction
        self.context = context
        self._indices = np.zeros(0, dtype=np.int64)

    def randomize(self, foreground_slices: np.ndarray, n_slices: int) -> None:
        n_pos = int(self.R.binomial(self.num_samples, self.pos_fraction)) if foreground_slices.size else 0
        pos = self.R.choice(foreground_slices, size=n_pos) if n_pos else np.zeros(0, np.int64)
        rest = self.R.randint(0, n_slices, size=self.num_samples - n_pos)
        self._indices = np.concatenate([pos, rest]).astype(np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        if self.label_key not in d:
            raise KeyError(f"RandSliceSamplerd samples by {self.label_key!r}, which the data lack (keys: {list(d)})")
        label = d[self.label_key]
        affine = label.affine if isinstance(label, MetaTensor) else torch.eye(4, dtype=torch.float64)
        axis = slice_axis_index(self.slice_axis_rule, affine)
        per_slice = torch.movedim(torch.as_tensor(label), axis + 1, 0).flatten(1).amax(dim=1)
        foreground = np.flatnonzero(per_slice.numpy() > 0)
        self.randomize(foreground, int(per_slice.shape[0]))
        samples: list[dict[Hashable, Any]] = [dict(d) for _ in range(self.num_samples)]
        for key in self.key_iterator(d):
            volume = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key], affine=affine)
            context = 0 if key == self.label_key else self.context
            # Plain tensors here: indexing a MetaTensor would try to split its metadata.
            stack = slice_stack(volume.as_tensor(), axis, self._indices, context)
            for i, sample in enumerate(samples):
                sample[key] = self._slice(volume, stack[i], axis, int(self._indices[i]), context)
        for i, sample in enumerate(samples):
            sample["slice_index"] = int(self._indices[i])
        return samples

    def _slice(self, volume: MetaTensor, pixels: torch.Tensor, axis: int, index: int, context: int) -> MetaTensor:
        """(C', H, W) MetaTensor: ``volume``'s metadata, the slice's 2D affine, the cut recorded."""
        # A copy, so that each sample owns its pixels rather than a view of the whole stack
        # (which a DataLoader worker would otherwise pickle once per sample).
        out = MetaTensor(pixels.clone())
        out.copy_meta_from(volume)
        out.affine = slice_affine(volume.affine, axis, index)
        return self.push_transform(
            out,
            orig_size=tuple(int(s) for s in volume.shape[1:]),
            extra_info={"slice_axis": axis, "slice_index": index, "context": context},
        )
