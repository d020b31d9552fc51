"""The validation set the agreement benchmarks score against: a model folder, its labels,
a manifest split's images and their reference label maps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.bundled import default_model_dir
from medseg.data.manifest import load_manifest
from medseg.io import read_scan
from medseg.model import load_spec
from medseg.spec import ModelSpec


@dataclass(frozen=True)
class ValidationSet:
    """``values``: the foreground label values; ``names`` every label's name by value;
    ``refs`` the reference label map (X, Y, Z ints) by image file name."""

    model: Path
    spec: ModelSpec
    values: list[int]
    names: dict[int, str]
    images: list[Path]
    refs: dict[str, np.ndarray]

    def describe(self) -> str:
        """The model and how many cases, for the benchmark's header line."""
        members = f"ensemble of {len(self.spec.members)}" if self.spec.members else "one network"
        return f"{self.model} ({members}); {len(self.images)} cases"


def validation_set(manifest: Path, split: str, model: Path | None = None) -> ValidationSet:
    """``split`` of ``manifest`` with ``model`` (default: the bundled model)."""
    model = model or default_model_dir()
    spec = load_spec(model)
    cases = load_manifest(manifest).cases(split)
    return ValidationSet(
        model=model,
        spec=spec,
        values=[lab.value for lab in spec.labels if lab.value != 0],
        names={lab.value: lab.name for lab in spec.labels},
        images=[case.image for case in cases],
        refs={case.image.name: np.rint(np.asarray(read_scan(case.label).array[0])).astype(int) for case in cases},
    )
