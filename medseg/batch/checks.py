"""What a finished label map says about itself: label volumes, and reasons to doubt it.

A run never reports a result as plainly fine when it is empty or when the scan lies far
outside what the model was trained on (another modality; voxel sizes or a field of view the
training data never had). The training domain comes from the model's provenance
(``training_data``: modality, and per-axis ranges of spacing and shape, sorted so that they
do not depend on how a file stores its axes), recorded by training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medseg.io.volume import Volume
from medseg.spec import ModelSpec

# How far outside the training range a scan may lie before its result is doubted.
SPACING_FACTOR = 2.0
SHAPE_FACTOR = 4.0


def label_volumes_ml(labels: np.ndarray, volume: Volume, spec: ModelSpec) -> dict[str, float]:
    """Millilitres per foreground label of ``labels`` (X, Y, Z) on ``volume``'s grid."""
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    counts = np.zeros(max(spec.label_values) + 1, dtype=np.int64)
    # Slab by slab: bincount of the whole map would first copy it to int64 (8x its size).
    for start in range(0, labels.shape[-1], 16):
        counts += np.bincount(labels[..., start : start + 16].ravel(), minlength=len(counts))[: len(counts)]
    return {lab.name: round(float(counts[lab.value]) * voxel_ml, 3) for lab in spec.labels if lab.value}


def result_warnings(labels: np.ndarray, volume: Volume, spec: ModelSpec, modality: str = "") -> list[str]:
    """Why the result of ``volume`` (with DICOM ``modality``, when known) may mislead."""
    warnings = []
    if not labels.any():
        warnings.append(
            f"no voxel was labelled: check that the scan shows what {spec.name} was trained on (preset {spec.preset})"
        )
    domain = spec.provenance.get("training_data")
    if isinstance(domain, Mapping):
        warnings += _outside_domain(volume, domain, modality)
    return warnings


def _outside_domain(volume: Volume, domain: Mapping[str, Any], modality: str) -> list[str]:
    out = []
    trained = str(domain.get("modality", ""))
    if modality and trained and not _same_modality(modality, trained):
        out.append(f"the scan is {modality} but the model was trained on {trained}: the result is likely meaningless")
    spacing = sorted(volume.geometry.spacing)
    shape = sorted(volume.geometry.shape)
    for name, values, factor, unit in (("spacing", spacing, SPACING_FACTOR, " mm"), ("shape", shape, SHAPE_FACTOR, "")):
        bounds = domain.get(name)
        if not isinstance(bounds, Mapping) or "min" not in bounds or "max" not in bounds:
            continue
        low, high = sorted(bounds["min"]), sorted(bounds["max"])
        if any(v < lo / factor or v > hi * factor for v, lo, hi in zip(values, low, high)):
            out.append(
                f"{name} {_text(values)}{unit} lies far outside the training data's "
                f"{_text(low)}-{_text(high)}{unit}: check the result (is this the kind of scan the model was made for?)"
            )
    return out


def _same_modality(scan: str, trained: str) -> bool:
    """DICOM says "MR"/"CT"; dataset descriptions say "MRI", "T1", "FLAIR", "CT"...: compare
    the kind of scanner, and only when both are recognised."""
    a, b = _scanner(scan), _scanner(trained)
    return a is None or b is None or a == b


def _scanner(text: str) -> str | None:
    word = text.strip().upper()
    if word.startswith("MR") or word in ("T1", "T2", "FLAIR", "T1W", "T2W", "PD", "DWI", "ADC"):
        return "MR"
    if word.startswith("CT"):
        return "CT"
    if word in ("PT", "PET", "US", "XA", "CR", "DX", "MG", "NM"):
        return word
    return None


def _text(values: list[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)
