"""Overlap and surface metrics per label, in physical units (millimetres).

Label maps are (X, Y, Z) integer arrays on one grid with ``spacing`` (3,) mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    """Dice of label ``value``; 1.0 when neither map has it (nothing to find, nothing found)."""
    a, b = pred == value, ref == value
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dice_per_label(pred: np.ndarray, ref: np.ndarray, values: Sequence[int]) -> dict[int, float]:
    return {v: dice(pred, ref, v) for v in values}


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, value: int, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """(95th-percentile Hausdorff distance in mm, normalised surface Dice at ``tolerance_mm``).

    Uses MONAI's metric functions with the voxel spacing, so anisotropic grids are measured
    in millimetres. HD95 is nan (and NSD 0) when only one of the maps has the label; both
    are perfect (0 mm, 1.0) when neither has it.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    a, b = pred == value, ref == value
    if not a.any() and not b.any():
        return 0.0, 1.0
    if not a.any() or not b.any():
        return float("nan"), 0.0
    ya = torch.from_numpy(np.stack([~a, a])[None].astype(np.float32))
    yb = torch.from_numpy(np.stack([~b, b])[None].astype(np.float32))
    spacing = [float(s) for s in spacing]
    hd95 = compute_hausdorff_distance(ya, yb, include_background=False, percentile=95, spacing=spacing)
    nsd = compute_surface_dice(ya, yb, class_thresholds=[tolerance_mm], include_background=False, spacing=spacing)
    return float(hd95.flatten()[0]), float(nsd.flatten()[0])
