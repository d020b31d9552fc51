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
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from medseg.inference.options import InferenceOptions
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import SlicePredictor
from medseg.model import Model
from medseg.networks.ensemble import SliceEnsemble
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

logger = logging.getLogger(__name__)


def _member_spec(layout: Mapping[str, Any]) -> ModelSpec:
    """A ModelSpec carrying a member's layout: what ``SlicePredictor`` reads (labels and
    preset are placeholders; the bundle normalises intensities and names the labels)."""
    network = NetworkSpec(**dict(layout["network"]))
    spacing = layout["spacing"]
    return ModelSpec(
        labels=labels_from_names([f"class {i}" for i in range(network.out_channels)]),
        network=network,
        preset="none",
        slice_axis=layout["slice_axis"],
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        window=(int(layout["window"][0]), int(layout["window"][1])),
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
        out = []
        for b in range(inputs.shape[0]):
            image = _item(inputs, b)
            total = torch.zeros((network.out_channels, *image.shape[1:]), dtype=torch.float32)
            for predictor in predictors:
                predictor.add_probabilities(image, total, logits=lone)
            out.append(total if lone else total / len(predictors))
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


def scan_datalist(dataset_dir: str | Path) -> list[dict[str, str]]:
    """The scans under ``dataset_dir`` (NIfTI/NRRD/MHA files and DICOM series, found as
    ``medseg segment`` finds them) as a MONAI datalist: ``{"image": path}``, plus
    ``"series_uid"`` where a folder holds several DICOM series. Output folders of medseg
    runs are left out. Raises a ScanError naming the folder when it holds no scan."""
    from medseg.errors import ScanError
    from medseg.io.discover import discover

    found = discover(Path(dataset_dir))
    if not found.scans:
        raise ScanError(Path(dataset_dir), "holds no scan medseg can read", "point --dataset_dir at the scans")
    items = []
    for scan in found.scans:
        item = {"image": str(scan.path)}
        if scan.series is not None:
            item["series_uid"] = scan.series.uid
        items.append(item)
    return items
