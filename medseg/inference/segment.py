"""Segment one volume in memory: preprocess -> predict -> back to the original grid.

The lower-level call under ``medseg.segment`` (which adds discovery, reading, writing,
resume and the run report): ``segment_volume(volume, predictor)`` returns the label map on
``volume``'s own grid. Its two steps are public for the batch runner, which runs them in
different threads: :func:`prepare` (orientation, intensity; in the reader thread) and
:func:`predict_labels` (the network, then back to the original grid).

Memory: preprocessing works in place on one volume (a CT's stored int16, windowed slice
batch by slice batch; else float32), the predictor holds a uint8 label map, and the
network's input is freed before the labels are restored, so a CT costs about 0.75x its
float32 size (``benchmarks/memory.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medseg.errors import ScanError
from medseg.inference.options import Progress
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor, argmax_labels
from medseg.io.monai_reader import volume_to_metatensor
from medseg.io.readers import COMPACT_TYPES
from medseg.io.volume import Geometry, Volume
from medseg.spec import ModelSpec
from medseg.transforms import build_transforms
from medseg.transforms.intensity import defer_preset, per_voxel

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


@dataclass
class PreparedScan:
    """A scan ready for the network: ``image`` (C, X', Y', Z') MetaTensor in RAS orientation
    with the intensity preset applied (float32), or pending for each slice batch (integers,
    ``medseg.transforms.intensity.pending_preset``), made by ``transforms``, whose inverse
    (the operations ``image`` recorded) puts results back on ``geometry``'s grid."""

    image: MetaTensor
    transforms: Compose
    geometry: Geometry
    source: Path

    def drop_voxels(self) -> None:
        """Free the image's voxels once the network is done with them; its metadata and
        recorded operations (all that restoring results needs) stay."""
        image = self.image
        self.image = MetaTensor(
            torch.empty(0), meta=dict(image.meta), applied_operations=list(image.applied_operations)
        )


def prepare(volume: Volume, spec: ModelSpec, inplace: bool = False) -> PreparedScan:
    """``volume`` preprocessed for a model with ``spec``: orientation and intensity preset.

    The transforms work in place on one array (``build_transforms(..., inplace=True)``), so
    preprocessing holds one volume, never two. ``inplace`` uses ``volume.array`` itself, which
    then holds the network input, no longer the scan as read: for callers that own ``volume``
    and need only its geometry after this (the batch runner). Otherwise a copy of the voxels
    is preprocessed and ``volume`` is left as it was.

    Integer voxels (a CT read as its stored int16, ``read_file(..., integers=True)``) under a
    per-voxel preset (a CT window) stay integers: the preset is recorded as pending on the
    image and applied to each slice batch as it is sent (``medseg.transforms.intensity``),
    so the volume costs 2 bytes a voxel instead of 4 and the network input is the same.
    """
    _check_channels(volume, spec.image_channels)
    deferred = volume.array.dtype in COMPACT_TYPES and per_voxel(spec.preset)
    transforms = build_transforms(spec, load=False, resample=False, inplace=True, intensity=not deferred)
    if not inplace:
        volume = dataclasses.replace(volume, array=volume.array.copy())
    image = transforms({"image": volume_to_metatensor(volume)})["image"]
    if deferred:
        defer_preset(image, spec.preset)
    return PreparedScan(image, transforms, volume.geometry, volume.source)


def _restored(prepared: PreparedScan, array: torch.Tensor) -> np.ndarray:
    """``array`` (C, X', Y', Z') or (X', Y', Z') back on the scan's grid, grid checked."""
    image = prepared.image
    restored = to_original_grid(array, image, prepared.transforms)
    back = Geometry.from_affine_ras(image.meta["original_affine"], restored.shape[-3:])
    problem = prepared.geometry.mismatch(back)
    if problem is not None:  # a bug in medseg, never a user error
        raise RuntimeError(f"{prepared.source}: restored grid differs from the input's: {problem}")
    return restored


def predict_labels(
    prepared: PreparedScan, predictor: SlicePredictor | EnsemblePredictor, progress: Progress | None = None
) -> np.ndarray:
    """Label map (X, Y, Z) uint8 on the scan's own grid. The network's input is freed
    (``prepared.drop_voxels()``) before the labels are put back on that grid, so the two
    are never held together with the restored copy."""
    spec = predictor.model.spec
    labels = postprocess(predictor.predict(prepared.image, progress), spec.postprocess, spec.label_values[1:])
    prepared.drop_voxels()
    return _restored(prepared, labels)


def predict_labels_and_probabilities(
    prepared: PreparedScan, predictor: SlicePredictor | EnsemblePredictor, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (X, Y, Z) uint8 and class probabilities (classes, X, Y, Z) float32, both on
    the scan's grid; frees the network's input as :func:`predict_labels` does."""
    spec = predictor.model.spec
    probs = predictor.predict_probabilities(prepared.image, progress)
    prepared.drop_voxels()
    labels = postprocess(argmax_labels(probs, predictor.values, dim=0), spec.postprocess, spec.label_values[1:])
    return _restored(prepared, labels), _restored(prepared, probs)


def segment_volume(
    volume: Volume, predictor: SlicePredictor | EnsemblePredictor, progress: Progress | None = None
) -> np.ndarray:
    """Label map (X, Y, Z) uint8 on ``volume``'s own grid; ``progress(done, total)`` slices.
    ``volume`` is left as it was (its voxels are copied once for preprocessing)."""
    return predict_labels(prepare(volume, predictor.model.spec), predictor, progress)


def segment_volume_with_probabilities(
    volume: Volume, predictor: SlicePredictor | EnsemblePredictor, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (X, Y, Z) uint8 and class probabilities (classes, X, Y, Z) float32, both on
    ``volume``'s grid. Holds the probabilities of the whole volume: use only when needed."""
    return predict_labels_and_probabilities(prepare(volume, predictor.model.spec), predictor, progress)
