"""Where on each slice the network looks: no pixel more than the result needs.

A slice goes through the network as one *region* of its (resampled) grid, the same for every
slice of a volume (one shape, so engines compile once). The region:

- covers the scan's *content* (voxels above the volume's minimum, the padding value: air in
  CT after the intensity window) plus a margin, and leaves out the uniform background around
  it, as nnU-Net crops to the non-zero region. Outside it the result is background;
- is padded to the smallest size the network accepts (a multiple of 2**depth), or, when the
  slice fits the window training fed the network, to that window exactly as training padded
  it (centred, with the volume's minimum): what the network saw in training, no more;
- is run whole when it fits the model's window, else by a sliding window of that size.

A 36x52 MR slice is padded to 48x64, not to a 512x512 window (10x the pixels), and a 512x512
CT slice whose body spans 440x310 pixels runs as 480x352 (two thirds of the pixels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Background pixels kept on each side of the content, in the network's grid. Inside the crop
# the network sees what it would see in the whole slice (the cut-off pixels are background
# of the padding value too), except that its convolutions' zero padding now starts at the
# crop's edge; this margin keeps that edge away from the content (measured in
# benchmarks/RESULTS.md: labels agree with the uncropped run to >= 99.99% of voxels).
CONTENT_MARGIN = 16

# Slices per chunk when scanning a volume for its content (bounds the temporary masks).
_CHUNK = 16

Span = tuple[int, int]
"""[start, stop) along one slice axis; may reach past [0, n), where it is padding."""


@dataclass(frozen=True)
class SliceRegion:
    """The rows and columns of an (H, W) slice the network is given, and how.

    ``whole``: the region goes through the network in one piece (its size is then a multiple
    of 2**depth); otherwise by a sliding window of the model's window.
    """

    rows: Span
    cols: Span
    whole: bool

    @property
    def size(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    def covers(self, size: tuple[int, int]) -> bool:
        """Whether every pixel of an (H, W) slice is inside the region (nothing cropped)."""
        return self.rows[0] <= 0 and self.cols[0] <= 0 and self.rows[1] >= size[0] and self.cols[1] >= size[1]


def content_box(
    image: torch.Tensor,
    axis: int,
    background: float,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Span, Span] | None:
    """Rows and columns of the slices along voxel ``axis`` of ``image`` (C, X, Y, Z) where
    any slice and channel holds a voxel above ``background``; None when none does.

    ``transform`` maps each slab of voxels first (a copy: a pending intensity preset).
    Rows and columns are the two other voxel axes in increasing order (``slice_stack``'s H, W).
    """
    volume = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    n = int(volume.shape[1 + axis])
    plane: torch.Tensor | None = None
    for start in range(0, n, _CHUNK):
        slab = volume.narrow(1 + axis, start, min(_CHUNK, n - start))
        if transform is not None:
            slab = transform(slab)
        hit = (slab > background).any(dim=0).any(dim=axis)  # (H, W)
        plane = hit if plane is None else plane | hit
    if plane is None:
        return None
    rows, cols = torch.nonzero(plane.any(dim=1)).flatten(), torch.nonzero(plane.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def scale_box(box: tuple[Span, Span], native: tuple[int, int], resized: tuple[int, int]) -> tuple[Span, Span]:
    """``box`` on a slice grid of size ``native`` -> the box covering it on ``resized``."""
    out = []
    for (lo, hi), n, m in zip(box, native, resized):
        out.append((max(0, math.floor(lo * m / n)), min(m, math.ceil(hi * m / n))))
    return out[0], out[1]


def plan_region(
    size: tuple[int, int],
    box: tuple[Span, Span] | None,
    *,
    multiple: int,
    window: tuple[int, int],
    trained_window: tuple[int, int] | None,
    margin: int = CONTENT_MARGIN,
) -> SliceRegion:
    """The region of an (H, W) slice the network is given (see the module docstring).

    ``box`` is the content box on this grid (None: the whole slice is content). A slice axis
    that fits ``trained_window`` is never cropped: it is padded to the trained size, centred,
    exactly as training padded it.
    """
    trained = trained_window or (0, 0)
    crop = []
    for axis, n in enumerate(size):
        if box is None or n <= trained[axis]:
            crop.append((0, n))
        else:
            lo, hi = box[axis]
            crop.append((max(0, lo - margin), min(n, hi + margin)))
    crop_size = [hi - lo for lo, hi in crop]
    if not all(s <= w for s, w in zip(crop_size, window)):
        return SliceRegion(crop[0], crop[1], whole=False)
    spans = []
    for (lo, _), s, n, t in zip(crop, crop_size, size, trained):
        want = -(-s // multiple) * multiple
        if s <= t:
            want = max(want, t)
        if want >= n:  # the whole axis, padded evenly on both sides as pad_slices does
            before = (want - n) // 2
            spans.append((-before, want - before))
        else:  # a crop: centred on the content, kept inside the slice
            start = min(max(lo - (want - s) // 2, 0), n - want)
            spans.append((start, start + want))
    return SliceRegion(spans[0], spans[1], whole=True)


def cut_region(batch: torch.Tensor, region: SliceRegion, pad_value: float) -> torch.Tensor:
    """The region of (N, C, H, W) slices: cropped where it lies inside them, padded with
    ``pad_value`` where it reaches past them."""
    h, w = batch.shape[-2:]
    (r0, r1), (c0, c1) = region.rows, region.cols
    inner = batch[..., max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)]
    pads = (max(0, -c0), max(0, c1 - w), max(0, -r0), max(0, r1 - h))
    return torch.nn.functional.pad(inner, pads, value=pad_value) if any(pads) else inner


def paste_region(
    scores: torch.Tensor, region: SliceRegion, size: tuple[int, int], background: torch.Tensor
) -> torch.Tensor:
    """Scores (N, K, *region.size) -> (N, K, *size) on the slice: the padding cut off, and
    outside a crop ``background`` (K,) per pixel (scores whose argmax and softmax are the
    background class)."""
    h, w = size
    (r0, r1), (c0, c1) = region.rows, region.cols
    inside = scores[..., max(0, -r0) : min(r1, h) - r0, max(0, -c0) : min(c1, w) - c0]
    if region.covers(size):
        return inside
    full = background.to(scores.dtype)[None, :, None, None].expand(scores.shape[0], -1, h, w).clone()
    full[..., max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)] = inside
    return full
