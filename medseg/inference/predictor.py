"""Run a 2D network over the slices of a volume, batch by batch, straight to a label map.

Memory stays bounded by one slice batch: logits exist only for the batch in flight and are
reduced to uint8 labels (argmax) before the next batch, so no full-volume float buffer of
class scores is ever held.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from monai.inferers import sliding_window_inference

from medseg.inference.options import DEFAULT_INFERENCE, InferenceOptions, Progress, resolve_device
from medseg.model import Model
from medseg.transforms.grid import InPlaneResampling, in_plane_axes, slice_axis_index, spacing_from_affine
from medseg.transforms.slices import pad_slices, slice_stack

logger = logging.getLogger(__name__)

# Pixels per network call when the batch size is automatic. On CPUs, batches beyond about
# one 512x512 slice fall out of cache and run slower per slice (measured: 0.30 s/slice at
# batch 1 vs 0.45 at batch 4, base 16); small slices still need batching to amortise calls.
_AUTO_BATCH_PIXELS = {"cpu": 512 * 512, "cuda": 16 * 512 * 512}


def auto_batch_size(device: torch.device, slice_pixels: int) -> int:
    budget = _AUTO_BATCH_PIXELS.get(device.type, _AUTO_BATCH_PIXELS["cpu"])
    return int(min(256, max(1, budget // max(1, slice_pixels))))


def _moved_shape(spatial: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """(X, Y, Z) with ``axis`` moved first: the (S, H, W) layout of slice batches."""
    rest = [int(n) for i, n in enumerate(spatial) if i != axis]
    return (int(spatial[axis]), *rest)


class SlicePredictor:
    """Segments canonical volumes (C, X, Y, Z) slice by slice with ``model``'s network.

    Slices whose (resampled) size fits ``model.spec.window`` go through the network whole,
    padded to the window as in training; larger slices use MONAI's sliding window of the window
    size with Gaussian blending.

    When the model has a target in-plane spacing, each slice batch is resampled to it
    (bilinear), and the class *probabilities* are resampled back to the native in-plane grid
    before the argmax. Resampling probabilities rather than labels keeps sub-voxel boundary
    information (a label map resampled with nearest neighbour is blocky and shifts edges by
    up to half a voxel), and since the resampling never mixes slices, doing it per batch is
    exactly the same as doing it on a full probability volume, without the memory.
    """

    def __init__(self, model: Model, options: InferenceOptions = DEFAULT_INFERENCE) -> None:
        self.model = model
        self.options = options
        self.device = resolve_device(options.device)
        # Channels-last lets oneDNN (CPU) and cuDNN pick faster convolution kernels: about
        # 1.3x on this project's 2-core CPU (benchmarks/inference.py).
        self.network = model.network.to(self.device, memory_format=torch.channels_last).eval()
        self.lut = torch.tensor(model.spec.label_values, dtype=torch.uint8)

    def predict(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Label map (X, Y, Z) uint8 for a preprocessed MetaTensor ``image`` (C, X, Y, Z).

        ``progress(done, total)`` is called with slice counts after each batch.
        """
        axis = slice_axis_index(self.model.spec.slice_axis, image.affine)
        labels = torch.empty(_moved_shape(image.shape[1:], axis), dtype=torch.uint8)
        for indices, scores in self._scores(image, progress):
            labels[indices.start : indices.stop] = self.lut[scores.argmax(dim=1).cpu()]
        return torch.movedim(labels, 0, axis)

    def predict_probabilities(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Class probabilities (classes, X, Y, Z) float32 for ``image`` (C, X, Y, Z)."""
        total = torch.zeros((len(self.lut), *image.shape[1:]), dtype=torch.float32)
        self.add_probabilities(image, total, progress)
        return total

    def add_probabilities(
        self, image: torch.Tensor, total: torch.Tensor, progress: Progress | None = None, logits: bool = False
    ) -> None:
        """Add this model's class probabilities for ``image`` into ``total`` (classes, X, Y, Z).

        ``logits``: add the network's logits instead where no resampling is needed (what
        ``predict`` takes the argmax of, so a lone model's labels come out identical).
        """
        axis = slice_axis_index(self.model.spec.slice_axis, image.affine)
        view = torch.movedim(total, axis + 1, 0)  # (S, classes, H, W), shares memory
        for indices, scores in self._scores(image, progress, probabilities=not logits):
            view[indices.start : indices.stop] += scores.float().cpu()

    def slice_count(self, image: torch.Tensor) -> int:
        """Slices of ``image`` (C, X, Y, Z) this model predicts (along its slice axis)."""
        return int(image.shape[1 + slice_axis_index(self.model.spec.slice_axis, image.affine)])

    def _scores(
        self, image: torch.Tensor, progress: Progress | None, probabilities: bool = False
    ) -> Iterator[tuple[range, torch.Tensor]]:
        """Per slice batch: its slice indices and scores (N, classes, H, W) on the native
        in-plane grid (logits, or probabilities when resampled or asked for).

        The batch goes to the model's in-plane spacing and its probabilities come back with
        the two directions of one ``InPlaneResampling``, the grid change the preprocessing
        Compose records for whole volumes (tested equal to its ``Compose.inverse``).
        """
        spec = self.model.spec
        axis = slice_axis_index(spec.slice_axis, image.affine)
        plane = in_plane_axes(axis)
        spacing = spacing_from_affine(image.affine)
        native = (int(image.shape[1 + plane[0]]), int(image.shape[1 + plane[1]]))
        grid = InPlaneResampling.to_spacing(native, (spacing[plane[0]], spacing[plane[1]]), spec.spacing)
        n_slices = int(image.shape[1 + axis])
        pad_value = float(image.min())
        step = self.options.batch_size or auto_batch_size(self.device, self._network_pixels(grid.resized))
        logger.debug("slice axis %d, %d slices %s -> %s", axis, n_slices, native, grid.resized)
        if progress is not None:
            progress(0, n_slices)
        with torch.inference_mode():
            for start in range(0, n_slices, step):
                indices = range(start, min(start + step, n_slices))
                batch = slice_stack(image, axis, indices, spec.context_slices)
                batch = grid.forward(batch.to(self.device, torch.float32), "bilinear")
                scores = self._logits(batch, pad_value)
                if not grid.identity or probabilities:
                    scores = grid.inverse(torch.softmax(scores.float(), dim=1), "bilinear")
                yield indices, scores
                if progress is not None:
                    progress(indices.stop, n_slices)

    def _network_pixels(self, size: tuple[int, int]) -> int:
        """Pixels per slice the network really receives: a slice that fits the window is
        padded to the whole window (a 32x32 slice of a 512 window costs 512x512), a larger
        one is the slice itself (its windows go through in ``sw_batch_size`` groups)."""
        window = self.model.spec.window
        fits = size[0] <= window[0] and size[1] <= window[1]
        return math.prod(window) if fits else math.prod(size)

    def _channels_last_network(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.contiguous(memory_format=torch.channels_last))

    def _logits(self, batch: torch.Tensor, pad_value: float) -> torch.Tensor:
        """(N, C, H, W) -> (N, classes, H, W) logits, whole slices or sliding window."""
        spec = self.model.spec
        with torch.autocast(
            self.device.type,
            dtype=torch.bfloat16 if self.options.precision == "bf16" else torch.float16,
            enabled=self.options.precision != "fp32",
        ):
            if batch.shape[-2] <= spec.window[0] and batch.shape[-1] <= spec.window[1]:
                # Padded to the window, as training pads (the window is a multiple of 2**depth).
                padded, crop = pad_slices(batch, spec.window, pad_value)
                padded = padded.contiguous(memory_format=torch.channels_last)
                return self.network(padded)[..., crop[0], crop[1]]
            return sliding_window_inference(
                batch,
                roi_size=spec.window,
                sw_batch_size=self.options.batch_size or auto_batch_size(self.device, math.prod(spec.window)),
                predictor=self._channels_last_network,
                overlap=self.options.overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=pad_value,
                progress=False,
            )


class EnsemblePredictor:
    """Averages the class probabilities of several models (for example 2D models that slice
    along different axes: a multi-view ensemble), then takes the argmax.

    Unlike a single model, this holds one float32 probability volume (classes, X, Y, Z) per
    scan, since each member visits the voxels in another order.
    """

    def __init__(self, model: Model, options: InferenceOptions = DEFAULT_INFERENCE) -> None:
        self.model = model
        self.members = [SlicePredictor(m, options) for m in model.members]
        self.lut = torch.tensor(model.spec.label_values, dtype=torch.uint8)

    def predict(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        return self.lut[self.predict_probabilities(image, progress).argmax(dim=0)]

    def predict_probabilities(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Mean class probabilities of the members, (classes, X, Y, Z) float32.

        ``progress`` counts every member's slices (members slice along different axes, so
        the total is the sum of their slice counts, not members x one count).
        """
        total = torch.zeros((len(self.lut), *image.shape[1:]), dtype=torch.float32)
        counts = [member.slice_count(image) for member in self.members]
        all_slices, before = sum(counts), [sum(counts[:i]) for i in range(len(counts))]
        for i, member in enumerate(self.members):
            member_progress = None
            if progress is not None:
                member_progress = lambda done, _, b=before[i]: progress(b + done, all_slices)  # noqa: E731
            member.add_probabilities(image, total, member_progress)
        return total / len(self.members)


def make_predictor(model: Model, options: InferenceOptions = DEFAULT_INFERENCE) -> SlicePredictor | EnsemblePredictor:
    """The predictor for ``model``: an ensemble when its model.json lists members."""
    return EnsemblePredictor(model, options) if model.members else SlicePredictor(model, options)
