"""medseg's inference as MONAI components, for bundles and MONAI workflows.

A bundle's ``inference.json`` (see ``medseg.export.bundle``) instantiates these:

- :class:`SliceEnsembleInferer`, a MONAI ``Inferer`` that runs a
  :class:`~medseg.networks.ensemble.SliceEnsemble` over whole volumes exactly as
  ``medseg segment`` does: each member along its own slice axis, with its context slices
  (2.5D), its in-plane spacing and window, slices padded with the volume's minimum (as
  training pads), sliding window for slices larger than the window, and the members'
  probabilities averaged. It uses medseg's own ``SlicePredictor``, so the two cannot drift.
- :class:`PostprocessLabelsd`, the model's label-map clean-up (``postprocess`` in model.json).
- :func:`scan_datalist`, the scans of a folder (files and DICOM series) as a MONAI datalist.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.transforms import MapTransform

from medseg.errors import ConfigError, MedsegError, ScanError
from medseg.inference.options import InferenceOptions
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor
from medseg.model import Model
from medseg.networks.ensemble import SliceEnsemble
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

logger = logging.getLogger(__name__)


def _check_member(network: SliceEnsemble, index: int) -> int:
    count = len(network.layouts)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"member_index {index!r} names no member: this model has {count}, numbered 0 to {count - 1}")
    return index


def member_layout(network: SliceEnsemble, index: int) -> dict[str, Any]:
    """The layout of member ``index`` of ``network`` (a bundle's ``train.json`` trains it);
    ConfigError for an index that names no member (negative ones included)."""
    return network.layouts[_check_member(network, index)]


def member_network(network: SliceEnsemble, index: int) -> torch.nn.Module:
    """Member ``index``'s network (checked as in :func:`member_layout`)."""
    return network.members[_check_member(network, index)]


def _member_spec(layout: Mapping[str, Any]) -> ModelSpec:
    """A ModelSpec carrying a member's layout: what ``SlicePredictor`` reads (labels and
    preset are placeholders; the bundle normalises intensities and names the labels)."""
    network = NetworkSpec(**dict(layout["network"]))
    spacing, trained = layout["spacing"], layout.get("trained_window")  # absent in older bundles
    return ModelSpec(
        labels=labels_from_names([f"class {i}" for i in range(network.out_channels)]),
        network=network,
        preset="none",
        slice_axis=layout["slice_axis"],
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        window=(int(layout["window"][0]), int(layout["window"][1])),
        trained_window=None if trained is None else (int(trained[0]), int(trained[1])),
        context_slices=int(layout["context_slices"]),
    )


def _item(inputs: torch.Tensor, b: int) -> MetaTensor:
    """Batch item ``b`` of ``inputs`` (B, C, X, Y, Z) as a MetaTensor with its own affine."""
    affine = inputs.affine if isinstance(inputs, MetaTensor) else None
    if affine is None:
        raise ValueError(
            "SliceEnsembleInferer needs MetaTensor inputs carrying their affine (load with "
            "LoadScand or LoadImaged): the affine decides each member's slice axis"
        )
    affine = affine[b] if affine.ndim == 3 else affine
    return MetaTensor(inputs[b].as_tensor(), affine=affine)


class SliceEnsembleInferer(Inferer):
    """MONAI ``Inferer``: volumes (B, C, X, Y, Z) in RAS orientation with normalised
    intensities -> (B, classes, X, Y, Z) scores whose argmax over the class axis is the label
    (the members' mean probabilities; a lone member's logits where no resampling is needed,
    as ``medseg segment`` takes the argmax of). Scores are a float32 MetaTensor on the CPU
    carrying the inputs' metadata and recorded operations (for ``Invertd``).

    Args:
        batch_size: slices per network call (None: sized by pixel count, as medseg does).
        overlap: sliding-window overlap for slices larger than a member's window.
        precision: "fp32", "bf16" or "fp16" (autocast), as ``medseg segment --precision``.
    """

    def __init__(self, batch_size: int | None = None, overlap: float = 0.25, precision: str = "fp32") -> None:
        super().__init__()
        self.batch_size = batch_size
        self.overlap = overlap
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(network, SliceEnsemble):
            raise TypeError(
                f"SliceEnsembleInferer runs a medseg SliceEnsemble, got {type(network).__name__}; "
                "build the network with medseg.networks.ensemble.SliceEnsemble (a bundle's network_def)"
            )
        if inputs.ndim != 5:
            raise ValueError(
                f"SliceEnsembleInferer takes a batch of volumes (B, C, X, Y, Z), got shape {tuple(inputs.shape)}; "
                "add the batch axis (image.unsqueeze(0))"
            )
        if inputs.shape[1] != network.image_channels:
            source = inputs.meta.get("filename_or_obj", "the input") if isinstance(inputs, MetaTensor) else "the input"
            source = source[0] if isinstance(source, (list, tuple)) and source else source
            raise ScanError(
                Path(str(source)),
                f"has {inputs.shape[1]} channel(s) but the model takes {network.image_channels}",
                "give a single 3D volume per scan (split 4D series and colour images first)"
                if inputs.shape[1] > network.image_channels
                else "give the model the channels it was trained with",
            )
        device = inputs.device
        options = InferenceOptions(
            device=f"{device.type}:{device.index}"
            if device.type == "cuda" and device.index is not None
            else device.type,
            batch_size=self.batch_size,
            overlap=self.overlap,
            precision=self.precision,
        )
        predictors = [
            SlicePredictor(Model(_member_spec(layout), member, Path(".")), options)
            for layout, member in zip(network.layouts, network.members)
        ]
        lone = len(predictors) == 1
        # Several members are summed as medseg segment sums them (one fixed-point
        # accumulator), so the bundle's masks equal medseg's to the voxel.
        ensemble = None if lone else EnsemblePredictor.of(predictors, tuple(range(network.out_channels)))
        out = []
        for b in range(inputs.shape[0]):
            image = _item(inputs, b)
            if ensemble is not None:
                out.append(ensemble.predict_probabilities(image))
                continue
            total = torch.zeros((network.out_channels, *image.shape[1:]), dtype=torch.float32)
            predictors[0].add_probabilities(image, total, logits=True)
            out.append(total)
        # A MetaTensor with the inputs' metadata, as MONAI's inferers return: Invertd reads
        # the recorded operations from it (given a plain tensor it silently inverts nothing).
        return MetaTensor(torch.stack(out)).copy_meta_from(inputs)


class PostprocessLabelsd(MapTransform):
    """The model's label-map clean-up on (1, X, Y, Z) label maps (``postprocess`` of model.json:
    "largest_component" keeps each label's largest 26-connected component; "none")."""

    def __init__(
        self, keys: KeysCollection, method: str, values: tuple[int, ...], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.method = method
        self.values = tuple(int(v) for v in values)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            cleaned = postprocess(torch.as_tensor(labels[0]).to(torch.uint8).cpu(), self.method, self.values)
            out = labels.clone()
            out[0] = cleaned.to(out.dtype)
            d[key] = out
        return d


def _source(data: Any) -> Path:
    name = data.meta.get("filename_or_obj", "?") if isinstance(data, MetaTensor) else "?"
    return Path(str(name))


class CheckLabelsd(MapTransform):
    """Refuse label maps that do not fit: values outside the model's label ``values``, or a
    grid other than the image's (``image_key``); and images with other than
    ``image_channels`` channels. A ScanError names the file (and the image), where the loss
    or metric would otherwise fail with an index, size or channel error."""

    def __init__(
        self,
        keys: KeysCollection,
        values: list[int],
        image_key: str = "image",
        image_channels: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.values = [int(v) for v in values]
        self.image_key = image_key
        self.image_channels = image_channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d.get(self.image_key)
        if image is not None and self.image_channels is not None and image.shape[0] != self.image_channels:
            raise ScanError(
                _source(image),
                f"has {image.shape[0]} channel(s) but the model takes {self.image_channels}",
                "give a single 3D volume per scan (split 4D series and colour images first)",
            )
        for key in self.key_iterator(d):
            label = d[key]
            if image is not None and tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise ScanError(
                    _source(label),
                    f"has a grid of {tuple(label.shape[1:])} voxels but its image {_source(image)} has "
                    f"{tuple(image.shape[1:])}",
                    "pair each image with the label map drawn on its own grid",
                )
            found = torch.unique(torch.as_tensor(label).round()).to(torch.int64).tolist()
            unknown = sorted(set(found) - set(self.values))
            if unknown:
                raise ScanError(
                    _source(label),
                    f"holds label value(s) {unknown[:10]} that the model does not have (its values: {self.values})",
                    "map the label values to the model's, or export a model with these labels",
                )
        return d


NAME_KEY = "medseg_name"  # a datalist item's output name (medseg's unique scan name)
FAILED_KEY = "medseg_failed"  # set on an item whose scan medseg refused, with the message


def scan_datalist(dataset_dir: str | Path, output_dir: str | Path | None = None) -> list[dict[str, str]]:
    """The scans under ``dataset_dir`` (NIfTI/NRRD/MHA files and DICOM series, found as
    ``medseg segment`` finds them) as a MONAI datalist: ``{"image": path, "medseg_name":
    name}``, plus ``"series_uid"`` for DICOM. Names are medseg's output names, unique within
    the folder (three ``case.*`` files or two series of one folder never share a mask).

    Like ``medseg segment``, refuses an ``output_dir`` that is or holds ``dataset_dir``
    (outputs could overwrite scans) and leaves out scans inside ``output_dir`` or inside
    medseg run folders (masks of an earlier run are not scans). Raises a ScanError naming the
    folder when it holds no scan."""
    from medseg.batch.run import _nothing_found, _refuse_inputs_inside, _without_outputs
    from medseg.io.discover import discover

    root = Path(dataset_dir)
    if output_dir is not None:
        _refuse_inputs_inside(Path(output_dir).absolute(), [root.absolute()])
    found = discover(root)
    if output_dir is not None:
        found = _without_outputs(found, Path(output_dir).absolute())
    for skipped in found.skipped:
        logger.info("passed over %s: %s", skipped.path, skipped.reason)
    if not found.scans:
        raise _nothing_found(found)
    items = []
    for scan in found.scans:
        item = {"image": str(scan.path), NAME_KEY: scan.name}
        if scan.series is not None:
            item["series_uid"] = scan.series.uid
        items.append(item)
    return items


def scan_name(metadict: Mapping[str, Any], saver: Any) -> dict[str, Any]:
    """``SaveImage(d)``'s ``output_name_formatter``: the output is named after the scan's
    medseg name (``NAME_KEY`` in its metadata, set by :class:`ScanDataset`), falling back to
    MONAI's rule (the file name) for items without one."""
    from monai.data.folder_layout import default_name_formatter

    name = metadict.get(NAME_KEY)
    if not name:
        return default_name_formatter(metadict, saver)
    # A suffix for SaveImage to strip, so dots inside the name (DICOM UIDs) are kept.
    return {"subject": f"{name}.nii.gz", "idx": None}


def _medseg_problem(err: BaseException) -> MedsegError | None:
    """The medseg error behind ``err`` (MONAI wraps a transform's error in RuntimeErrors)."""
    seen = err
    while seen is not None:
        if isinstance(seen, MedsegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class ScanDataset(Dataset):
    """MONAI ``Dataset`` over a :func:`scan_datalist`: an item whose scan medseg refuses (a
    DICOM series with a missing slice, a 4D file...) becomes ``{"image": path,
    "medseg_failed": message}`` instead of stopping the run, and each loaded image carries
    its medseg output name in its metadata (for :func:`scan_name`). Use batch size 1."""

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        try:
            out = super()._transform(index)
        except Exception as err:
            problem = _medseg_problem(err)
            if problem is None:
                raise
            return {"image": str(item.get("image")), FAILED_KEY: str(problem)}
        image = out.get("image") if isinstance(out, dict) else None
        if isinstance(image, MetaTensor) and NAME_KEY in item:
            image.meta[NAME_KEY] = item[NAME_KEY]
        return out


RECORD_FILE = "medseg-bundle-run.json"  # a bundle run's record in its output folder


def _names(image: Any) -> list[str]:
    """The scans of a collated batch, by medseg name (or file name)."""
    meta = image.meta if isinstance(image, MetaTensor) else {}
    names = meta.get(NAME_KEY) or meta.get("filename_or_obj") or ["?"]
    return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]


class ScanEvaluator(SupervisedEvaluator):
    """MONAI's ``SupervisedEvaluator`` that carries on past scans medseg refuses (while
    reading, or for the model: wrong channel count) as ``medseg segment`` does: each is
    logged with medseg's message (file, problem, fix), nothing is written for it, and the
    run ends with one summary line and a record, ``output_dir/medseg-bundle-run.json``
    (scans written, scans failed with their messages), which also marks the folder as
    outputs that later runs do not read as scans. ``failures`` lists (path, message);
    ``exit_status()`` is 3 when any scan failed (``medseg segment``'s status), else 0.
    """

    def __init__(self, *args: Any, output_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.failures: list[tuple[str, str]] = []
        self.written: list[str] = []
        from ignite.engine import Events

        self.add_event_handler(Events.COMPLETED, self._summary)

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> Any:
        if isinstance(batchdata, dict) and FAILED_KEY in batchdata:
            for path, message in zip(batchdata["image"], batchdata[FAILED_KEY]):
                self._failed(str(path), message)
            return []  # nothing to post-process or write
        names = _names(batchdata.get("image"))
        try:
            output = super()._iteration(engine, batchdata)
        except Exception as err:
            problem = _medseg_problem(err)
            if problem is None:
                raise
            self._failed(str(getattr(problem, "path", "?")), str(problem))
            return []
        self.written += names
        logger.info("[%d/%s] %s", engine.state.iteration, engine.state.epoch_length, ", ".join(names))
        return output

    def _failed(self, path: str, message: str) -> None:
        self.failures.append((path, message))
        logger.error("FAILED %s", message)

    def exit_status(self) -> int:
        return 3 if self.failures else 0

    def _summary(self, engine: Any) -> None:
        total = len(self.written) + len(self.failures)
        if self.failures:
            logger.error(
                "%d scan(s): %d segmented, %d failed (listed above)", total, len(self.written), len(self.failures)
            )
        else:
            logger.info("%d scan(s) segmented", total)
        if self.output_dir is not None:
            import json

            from medseg.io.files import atomic_path

            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "written": self.written,
                "failed": [{"input": path, "error": message} for path, message in self.failures],
            }
            with atomic_path(self.output_dir / RECORD_FILE) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
