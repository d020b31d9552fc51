"""2D slices cut from 3D volumes, for training (a seeded MONAI sampler) and inference.

``slice_stack`` is the one function that turns a volume into network input, so training
and inference see the same slices, in-plane orientation and context channels.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from medseg.transforms.grid import slice_axis_index


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


class RandSliceSamplerd(Randomizable, MapTransform):
    """Sample ``num_samples`` 2D slices from 3D (C, X, Y, Z) data along the model's slice axis.

    A fraction ``pos_fraction`` of the samples comes from slices whose ``label_key`` holds
    foreground (oversampling the structures to learn), the rest from all slices. Images get
    ``context`` neighbouring slices as channels; label maps never do. Returns a list of dicts
    with (C', H, W) tensors and the chosen ``slice_index``, like MONAI's ``RandCropByPosNegLabeld``.
    Seed it with ``set_random_state`` (MONAI's DataLoader does this per worker).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        slice_axis_rule: str,
        num_samples: int = 8,
        pos_fraction: float = 0.5,
        context: int = 0,
    ) -> None:
        MapTransform.__init__(self, keys)
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
        label = d[self.label_key]
        axis = slice_axis_index(self.slice_axis_rule, label.affine)
        per_slice = torch.movedim(torch.as_tensor(label), axis + 1, 0).flatten(1).amax(dim=1)
        foreground = np.flatnonzero(per_slice.numpy() > 0)
        self.randomize(foreground, int(per_slice.shape[0]))
        stacks = {
            key: slice_stack(d[key], axis, self._indices, 0 if key == self.label_key else self.context)
            for key in self.key_iterator(d)
        }
        return [
            {**{key: stacks[key][i] for key in stacks}, "slice_index": int(self._indices[i])}
            for i in range(self.num_samples)
        ]
