"""Run a 2D network over the slices of a volume, batch by batch, straight to a label map.

Memory stays bounded by one slice batch: logits exist only for the batch in flight and are
reduced to uint8 labels (argmax) before the next batch, so no full-volume float buffer of
class scores is ever held.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from medseg.inference.options import DEFAULT_INFERENCE, InferenceOptions, Progress, resolve_device
from medseg.inference.regions import SliceRegion, content_box, cut_region, paste_region, plan_region, scale_box
from medseg.model import Model
from medseg.transforms.grid import InPlaneResampling, in_plane_axes, slice_axis_index, spacing_from_affine
from medseg.transforms.intensity import apply_pending_, pending_preset
from medseg.transforms.slices import slice_stack

logger = logging.getLogger(__name__)

# Pixels per network call when the batch size is automatic. On CPUs, batches beyond about
# one 512x512 slice fall out of cache and run slower per slice (measured: 0.30 s/slice at
# batch 1 vs 0.45 at batch 4, base 16); small slices still need batching to amortise calls.
_AUTO_BATCH_PIXELS = {"cpu": 512 * 512, "cuda": 16 * 512 * 512}


def auto_batch_size(device: torch.device, slice_pixels: int) -> int:
    budget = _AUTO_BATCH_PIXELS.get(device.type, _AUTO_BATCH_PIXELS["cpu"])
    return int(min(256, max(1, budget // max(1, slice_pixels))))


def argmax_labels(scores: torch.Tensor, values: Sequence[int], dim: int = 1) -> torch.Tensor:
    """The label value of the highest-scoring class at each position, ``values[argmax]``:
    ``scores`` with the classes along ``dim`` -> uint8 labels without that axis, on the same
    device. The first class wins ties, and a NaN score wins (the first NaN), as with
    ``torch.argmax``.

    A running maximum over the classes rather than ``torch.argmax``: an argmax along the class
    axis of (N, classes, H, W) scores strides across memory and took 21.7 ms per 2-class
    512x512 slice against 1.0 ms for this (1.3 s of a 2.8 s run over 64 slices, 2-core EPYC),
    and 0.65 s for an int16 (3, 256, 256, 64) ensemble sum. It also writes the label values
    directly, with no int64 index volume to look them up from.
    """
    best = scores.select(dim, 0)
    labels = torch.full(best.shape, values[0], dtype=torch.uint8, device=scores.device)
    for c in range(1, scores.shape[dim]):
        candidate = scores.select(dim, c)
        better = candidate > best
        if candidate.is_floating_point():  # NaN is the largest, as torch.argmax has it
            better |= candidate.isnan() & ~best.isnan()
        labels.masked_fill_(better, values[c])
        best = torch.where(better, candidate, best)
    return labels


def _moved_shape(spatial: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """(X, Y, Z) with ``axis`` moved first: the (S, H, W) layout of slice batches."""
    rest = [int(n) for i, n in enumerate(spatial) if i != axis]
    return (int(spatial[axis]), *rest)


class SlicePredictor:
    """Segments canonical volumes (C, X, Y, Z) slice by slice with ``model``'s network.

    Each slice (resampled to the model's spacing, if it has one) goes through the network as
    the :class:`~medseg.inference.regions.SliceRegion` planned once per volume: cropped to the
    scan's content plus a margin, padded to the smallest size the network accepts (to the
    trained window when the slice fits it, as in training), run whole when it fits the
    model's window and by MONAI's Gaussian-blended sliding window of that size otherwise.
    The network runs in the engine and precision ``options`` ask for ("auto": the fastest
    for this device, ``medseg.inference.engines``).

    When the model has a target in-plane spacing, each slice batch is resampled to it
    (bilinear), and the class *probabilities* are resampled back to the native in-plane grid
    before the argmax. Resampling probabilities rather than labels keeps sub-voxel boundary
    information (a label map resampled with nearest neighbour is blocky and shifts edges by
    up to half a voxel), and since the resampling never mixes slices, doing it per batch is
    exactly the same as doing it on a full probability volume, without the memory.
    """

    def __init__(self, model: Model, options: InferenceOptions = DEFAULT_INFERENCE) -> None:
        from medseg.inference.engines import load_engine

        self.model = model
        self.options = options
        self.device = resolve_device(options.device)
        self.engine = load_engine(model, self.device, options.precision, options.engine)
        self.values = tuple(model.spec.label_values)  # label value of each class channel
        # Scores outside a crop: the background class wins the argmax and takes all the
        # softmax. Without a label 0 there is no background to fill with, so no crop.
        values = list(model.spec.label_values)
        self._background = None
        if 0 in values:
            self._background = torch.full((len(values),), -1e4)
            self._background[values.index(0)] = 0.0

    @property
    def precision(self) -> str:
        """The arithmetic the network runs in here ("auto" resolved for the device)."""
        return self.engine.precision

    def predict(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Label map (X, Y, Z) uint8 for a preprocessed MetaTensor ``image`` (C, X, Y, Z).

        ``progress(done, total)`` is called with slice counts after each batch.
        """
        axis = slice_axis_index(self.model.spec.slice_axis, image.affine)
        labels = torch.empty(_moved_shape(image.shape[1:], axis), dtype=torch.uint8)
        for indices, scores in self._scores(image, progress):
            labels[indices.start : indices.stop] = argmax_labels(scores, self.values).cpu()
        return torch.movedim(labels, 0, axis)

    def predict_probabilities(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Class probabilities (classes, X, Y, Z) float32 for ``image`` (C, X, Y, Z)."""
        total = torch.zeros((len(self.values), *image.shape[1:]), dtype=torch.float32)
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

    def region(self, image: torch.Tensor, pad_value: float) -> tuple[InPlaneResampling, SliceRegion]:
        """The in-plane resampling of ``image``'s (C, X, Y, Z) slices and the region of the
        resampled slice the network is given (the same for every slice of the volume);
        ``pad_value`` is the network input's minimum (padding, and what is not content)."""
        spec = self.model.spec
        axis = slice_axis_index(spec.slice_axis, image.affine)
        plane = in_plane_axes(axis)
        spacing = spacing_from_affine(image.affine)
        native = (int(image.shape[1 + plane[0]]), int(image.shape[1 + plane[1]]))
        grid = InPlaneResampling.to_spacing(native, (spacing[plane[0]], spacing[plane[1]]), spec.spacing)
        box = None
        if self._background is not None:
            preset = pending_preset(image)
            mapped = None if preset is None else lambda slab: apply_pending_(slab.to(torch.float32, copy=True), preset)
            box = content_box(image, axis, pad_value, mapped)
        region = plan_region(
            grid.resized,
            None if box is None else scale_box(box, native, grid.resized),
            multiple=2**spec.network.depth,
            window=spec.window,
            trained_window=spec.trained_window,
        )
        return grid, region

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
        preset = pending_preset(image)  # a CT window still to apply to each batch, or None
        # Plain tensors through the network: a MetaTensor sends every op of every layer
        # through MONAI's __torch_function__ (metadata a slice batch does not need).
        voxels = image.as_tensor() if isinstance(image, MetaTensor) else image
        # The input's minimum: the preset is monotone, so it maps the voxels' minimum there.
        pad_value = float(apply_pending_(voxels.min().float().reshape(1), preset))
        grid, region = self.region(image, pad_value)
        n_slices = int(image.shape[1 + axis])
        pixels = math.prod(region.size) if region.whole else math.prod(spec.window)
        step = self.options.batch_size or auto_batch_size(self.device, pixels)
        logger.debug("slice axis %d, %d slices %s -> %s, %s", axis, n_slices, grid.native, grid.resized, region)
        if progress is not None:
            progress(0, n_slices)
        with torch.inference_mode():
            for start in range(0, n_slices, step):
                indices = range(start, min(start + step, n_slices))
                batch = slice_stack(voxels, axis, indices, spec.context_slices)
                if preset is not None:
                    # On the CPU, where a whole-volume window would have run: CUDA divides
                    # by a scalar as a multiplication by its reciprocal (1 ulp apart).
                    batch = apply_pending_(batch.to(torch.float32), preset)
                batch = grid.forward(batch.to(self.device, torch.float32), "bilinear")
                scores = self._logits(batch, region, pad_value)
                if not grid.identity or probabilities:
                    scores = grid.inverse(torch.softmax(scores.float(), dim=1), "bilinear")
                yield indices, scores
                if progress is not None:
                    progress(indices.stop, n_slices)

    def _logits(self, batch: torch.Tensor, region: SliceRegion, pad_value: float) -> torch.Tensor:
        """(N, C, H, W) -> (N, classes, H, W) logits: the region whole or by sliding window,
        put back on the slice (background scores outside a crop)."""
        spec = self.model.spec
        inputs = cut_region(batch, region, pad_value)
        if region.whole:
            scores = self.engine(inputs)
        else:
            scores = sliding_window_inference(
                inputs,
                roi_size=spec.window,
                sw_batch_size=self.options.batch_size or auto_batch_size(self.device, math.prod(spec.window)),
                predictor=self.engine,
                overlap=self.options.overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=pad_value,
                progress=False,
            )
        background = self._background if self._background is not None else torch.zeros(scores.shape[1])
        return paste_region(scores, region, tuple(batch.shape[-2:]), background.to(scores.device))


class EnsemblePredictor:
    """Averages the class probabilities of several models (for example 2D models that slice
    along different axes: a multi-view ensemble), then takes the argmax.

    Each member visits the voxels in another order, so the members' probabilities are summed
    over the whole volume, in one compact accumulator: int16 (classes, X, Y, Z), to which each
    member adds its probabilities in fixed point, rounded to multiples of 1 / ``scale``
    (``scale`` = 32767 // members, so no sum can overflow). That is half a float32 sum's
    memory, and integer sums do not depend on the order of the members. The argmax is taken
    a slab at a time (no int64 index volume). A label can differ from a float32 sum's only
    where two classes' mean probabilities lie within 1 / (2 * ``scale``) of each other: on
    the bundled hippocampus-mr ensemble's 40 validation cases, 1 voxel of 2,574,471 differs
    from the float32 sum's labels (benchmarks/RESULTS.md, "Memory").
    """

    # The largest value of the int16 accumulator, and how many voxels one argmax step takes.
    ACCUMULATOR_MAX = 2**15 - 1
    ARGMAX_VOXELS = 2**22

    def __init__(self, model: Model, options: InferenceOptions = DEFAULT_INFERENCE) -> None:
        self.model = model
        self.members = [SlicePredictor(m, options) for m in model.members]
        self.values = tuple(model.spec.label_values)
        self.scale = self.ACCUMULATOR_MAX // max(1, len(self.members))

    @classmethod
    def of(cls, members: list[SlicePredictor], label_values: tuple[int, ...]) -> EnsemblePredictor:
        """An ensemble of predictors made elsewhere (a bundle's SliceEnsemble members), so
        it sums exactly as ``medseg segment`` does; ``label_values`` in channel order."""
        ensemble = cls.__new__(cls)
        ensemble.model, ensemble.members = None, list(members)
        ensemble.values = tuple(label_values)
        ensemble.scale = cls.ACCUMULATOR_MAX // max(1, len(members))
        return ensemble

    def predict(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Label map (X, Y, Z) uint8 for a preprocessed MetaTensor ``image`` (C, X, Y, Z)."""
        total = self._sum(image, progress)
        labels = torch.empty(total.shape[1:], dtype=torch.uint8)
        step = max(1, self.ARGMAX_VOXELS // max(1, total[0, :, :, 0].numel()))
        for k in range(0, total.shape[-1], step):
            labels[..., k : k + step] = argmax_labels(total[..., k : k + step], self.values, dim=0)
        return labels

    def predict_probabilities(self, image: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Mean class probabilities of the members, (classes, X, Y, Z) float32 (multiples of
        1 / (members * ``scale``): the fixed point sum :meth:`predict` takes the argmax of).

        ``progress`` counts every member's slices (members slice along different axes, so
        the total is the sum of their slice counts, not members x one count).
        """
        return self._sum(image, progress).float().div_(self.scale * len(self.members))

    def _sum(self, image: torch.Tensor, progress: Progress | None) -> torch.Tensor:
        """The members' probabilities summed in fixed point: (classes, X, Y, Z) int16."""
        total = torch.zeros((len(self.values), *image.shape[1:]), dtype=torch.int16)
        counts = [member.slice_count(image) for member in self.members]
        all_slices, before = sum(counts), [sum(counts[:i]) for i in range(len(counts))]
        for i, member in enumerate(self.members):
            member_progress = None
            if progress is not None:
                member_progress = lambda done, _, b=before[i]: progress(b + done, all_slices)  # noqa: E731
            axis = slice_axis_index(member.model.spec.slice_axis, image.affine)
            view = torch.movedim(total, axis + 1, 0)  # (S, classes, H, W), shares memory
            for indices, scores in member._scores(image, member_progress, probabilities=True):
                fixed = scores.float().cpu().clamp_(0, 1).mul_(self.scale).round_().to(torch.int16)
                view[indices.start : indices.stop] += fixed
        return total


def make_predictor(model: Model, options: InferenceOptions = DEFAULT_INFERENCE) -> SlicePredictor | EnsemblePredictor:
    """The predictor for ``model``: an ensemble when its model.json lists members."""
    return EnsemblePredictor(model, options) if model.members else SlicePredictor(model, options)


def how_it_runs(predictor: SlicePredictor | EnsemblePredictor) -> dict[str, str | float]:
    """Device, engine, precision and sliding-window overlap the network runs with, as the
    run report records them (an ensemble's members run alike; several values are joined
    with commas)."""
    members = predictor.members if isinstance(predictor, EnsemblePredictor) else [predictor]
    return {
        "device": str(members[0].device),
        "engine": ",".join(dict.fromkeys(m.engine.name for m in members)),
        "precision": ",".join(dict.fromkeys(m.engine.precision for m in members)),
        "overlap": members[0].options.overlap,
    }
