"""Training slices: volumes preprocessed once through the inference transforms, cut into 2D
slices along the model's slice axis, and sampled per epoch with foreground oversampling."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medseg.data.manifest import Case
from medseg.io import read_scan
from medseg.io.monai_reader import volume_to_metatensor
from medseg.io.volume import Geometry
from medseg.spec import ModelSpec
from medseg.transforms import build_transforms
from medseg.transforms.grid import slice_axis_index
from medseg.transforms.slices import pad_slices, slice_stack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceBank:
    """Every slice of the training volumes, padded to at least the window.

    ``images`` (S, C', H, W) float32 and ``labels`` (S, 1, H, W) uint8 (channel indices,
    not label values); ``foreground`` holds the indices of slices with any label > 0;
    ``domain`` the ranges of the training scans' spacing and shape (see ``scan_domain``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    foreground: np.ndarray
    case_of_slice: np.ndarray
    domain: dict = field(default_factory=dict)


def scan_domain(geometries: Sequence[Geometry]) -> dict:
    """Per-axis ranges of spacing (mm) and shape of the scans, each sorted so that they do not
    depend on how a file orders its axes: what the model saw, which runs compare new scans
    with (``medseg.batch.checks``)."""
    spacing = np.sort(np.asarray([g.spacing for g in geometries], dtype=float), axis=1)
    shape = np.sort(np.asarray([g.shape for g in geometries], dtype=int), axis=1)
    return {
        "cases": len(geometries),
        "spacing": {"min": spacing.min(0).round(4).tolist(), "max": spacing.max(0).round(4).tolist()},
        "shape": {"min": shape.min(0).tolist(), "max": shape.max(0).tolist()},
    }


def load_case(case: Case, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and label (as output-channel indices) through the exact inference transforms."""
    return _load_case(case, spec)[:2]


def _load_case(case: Case, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    transforms = build_transforms(spec, load=False, resample=True, label_keys=("label",))
    image, label = read_scan(case.image, case.series_uid), read_scan(case.label)
    data = transforms({"image": volume_to_metatensor(image), "label": volume_to_metatensor(label)})
    index_of = {lab.value: i for i, lab in enumerate(spec.labels)}
    lut = torch.zeros(256, dtype=torch.uint8)
    for value, i in index_of.items():
        lut[value] = i
    return data["image"], lut[data["label"].as_tensor().round().long().clamp(0, 255)], image.geometry


def build_slice_bank(cases: Sequence[Case], spec: ModelSpec) -> SliceBank:
    """Cut all slices of ``cases`` (same size by padding to the largest, at least the window)."""
    stacks, label_stacks, owners, geometries = [], [], [], []
    for i, case in enumerate(cases):
        image, label, geometry = _load_case(case, spec)
        geometries.append(geometry)
        axis = slice_axis_index(spec.slice_axis, image.affine.numpy())
        indices = range(image.shape[1 + axis])
        image = image.as_tensor()
        stacks.append((slice_stack(image, axis, indices, spec.context_slices), float(image.min())))
        label_stacks.append(slice_stack(torch.as_tensor(label), axis, indices))
        owners.append(np.full(len(indices), i))
    height = max(spec.window[0], *(s.shape[-2] for s, _ in stacks))
    width = max(spec.window[1], *(s.shape[-1] for s, _ in stacks))
    images = torch.cat([pad_slices(s, (height, width), v)[0] for s, v in stacks])
    labels = torch.cat([pad_slices(s, (height, width), 0)[0] for s in label_stacks])
    foreground = np.flatnonzero(labels.flatten(1).amax(dim=1).numpy() > 0)
    logger.info("%d slices (%d with foreground) of %dx%d", len(images), len(foreground), height, width)
    domain = scan_domain(geometries)
    return SliceBank(images.contiguous(), labels.contiguous(), foreground, np.concatenate(owners), domain)


def epoch_samples(bank: SliceBank, n: int, pos_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` slice indices: about ``pos_fraction`` from foreground slices, the rest uniform."""
    n_pos = round(n * pos_fraction) if len(bank.foreground) else 0
    pos = torch.as_tensor(bank.foreground)[torch.randint(len(bank.foreground), (n_pos,), generator=gen)]
    rest = torch.randint(len(bank.images), (n - n_pos,), generator=gen)
    both = torch.cat([pos, rest])
    return both[torch.randperm(n, generator=gen)]


def crop_batch(
    bank: SliceBank, indices: torch.Tensor, window: tuple[int, int], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C', h, w) and labels (N, 1, h, w) of ``indices``, randomly cropped to
    ``window`` when the bank's slices are larger."""
    images, labels = bank.images[indices], bank.labels[indices]
    h, w = images.shape[-2:]
    if (h, w) == tuple(window):
        return images, labels
    top = int(torch.randint(h - window[0] + 1, (1,), generator=gen))
    left = int(torch.randint(w - window[1] + 1, (1,), generator=gen))
    rows, cols = slice(top, top + window[0]), slice(left, left + window[1])
    return images[..., rows, cols], labels[..., rows, cols]
