"""Segment one volume in memory: preprocess -> predict -> back to the original grid.

The lower-level call under ``medseg.segment`` (which adds discovery, reading, writing,
resume and the run report): ``segment_volume(volume, predictor)`` returns the label map on
``volume``'s own grid.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medseg.errors import ScanError
from medseg.inference.options import Progress
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor
from medseg.io.monai_reader import volume_to_metatensor
from medseg.io.volume import Geometry, Volume
from medseg.transforms import build_transforms

logger = logging.getLogger(__name__)


def to_original_grid(labels: torch.Tensor, image: MetaTensor, transforms: Compose) -> np.ndarray:
    """Undo every recorded grid change of ``image`` on ``labels`` (X', Y', Z') uint8, or on
    per-class maps (C, X', Y', Z').

    This is the one place where preprocessing is inverted: MONAI replays the operations
    recorded in ``image.applied_operations`` (orientation, in-plane resampling) in reverse.
    Returns (X, Y, Z) on the grid the scan was read on.
    """
    channels = labels if labels.ndim == 4 else labels[None]
    restored = MetaTensor(channels, meta=dict(image.meta))
    restored.applied_operations = list(image.applied_operations)
    out = transforms.inverse({"image": restored})["image"].numpy()
    return out if labels.ndim == 4 else out[0]


def _check_channels(volume: Volume, wanted: int) -> None:
    if volume.channels != wanted:
        raise ScanError(
            volume.source,
            f"has {volume.channels} channel(s) (shape {volume.array.shape[1:]} x "
            f"{volume.channels}) but the model takes {wanted}",
            "give a single 3D volume per scan (split 4D series into 3D files first)"
            if volume.channels > wanted
            else "give the model the channels it was trained with",
        )


def _restored(volume: Volume, array: torch.Tensor, image: MetaTensor, transforms: Compose) -> np.ndarray:
    """``array`` (C, X', Y', Z') or (X', Y', Z') back on ``volume``'s grid, grid checked."""
    restored = to_original_grid(array, image, transforms)
    back = Geometry.from_affine_ras(image.meta["original_affine"], restored.shape[-3:])
    problem = volume.geometry.mismatch(back)
    if problem is not None:  # a bug in medseg, never a user error
        raise RuntimeError(f"{volume.source}: restored grid differs from the input's: {problem}")
    return restored


def _preprocess(volume: Volume, spec) -> tuple[MetaTensor, Compose]:
    _check_channels(volume, spec.image_channels)
    transforms = build_transforms(spec, load=False, resample=False)
    return transforms({"image": volume_to_metatensor(volume)})["image"], transforms


def segment_volume(
    volume: Volume, predictor: SlicePredictor | EnsemblePredictor, progress: Progress | None = None
) -> np.ndarray:
    """Label map (X, Y, Z) uint8 on ``volume``'s own grid; ``progress(done, total)`` slices."""
    spec = predictor.model.spec
    image, transforms = _preprocess(volume, spec)
    labels = postprocess(predictor.predict(image, progress), spec.postprocess, spec.label_values[1:])
    return _restored(volume, labels, image, transforms)


def segment_volume_with_probabilities(
    volume: Volume, predictor: SlicePredictor | EnsemblePredictor, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (X, Y, Z) uint8 and class probabilities (classes, X, Y, Z) float32, both on
    ``volume``'s grid. Holds the probabilities of the whole volume: use only when needed."""
    spec = predictor.model.spec
    image, transforms = _preprocess(volume, spec)
    probs = predictor.predict_probabilities(image, progress)
    labels = postprocess(predictor.lut[probs.argmax(dim=0)], spec.postprocess, spec.label_values[1:])
    return _restored(volume, labels, image, transforms), _restored(volume, probs, image, transforms)
