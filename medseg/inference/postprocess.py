"""Label-map clean-up applied after prediction, named in ``model.json`` (``postprocess``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads with the predictor; the names here must stay light for the CLI
    import torch

POSTPROCESS = ("none", "largest_component")


def keep_largest_component(labels: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
    """Keep, for each label in ``values``, only its largest 26-connected 3D component.

    labels: (X, Y, Z) uint8. Removed voxels become background (0). Suits structures known to
    be one piece (each hippocampus part); stray islands of a 2D model across slices go away.
    """
    from scipy import ndimage

    out = labels.numpy().copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in values:
        mask = out == value
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[mask & (components != sizes.argmax())] = 0
    import torch

    return torch.from_numpy(out)


def postprocess(labels: torch.Tensor, method: str, values: tuple[int, ...]) -> torch.Tensor:
    if method == "none":
        return labels
    if method == "largest_component":
        return keep_largest_component(labels, values)
    raise ValueError(f"unknown postprocess {method!r}; choose one of {POSTPROCESS}")
