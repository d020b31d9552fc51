"""The validation set the agreement benchmarks score against: a model folder, its labels,
a manifest split's images and their reference label maps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import medseg
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


def segment_labels(images: list[Path], model: Path, out: Path, **options) -> tuple[dict[str, np.ndarray], float]:
    """Label maps by image file name, and the seconds of one ``medseg.segment`` call over all
    ``images`` (which loads the model, as a command would); ``options`` go to the call."""
    start = time.perf_counter()
    report = medseg.segment(images, out, model, formats="nifti", **options)
    seconds = time.perf_counter() - start
    failed = [(r.name, r.error) for r in report.records if r.status != "ok"]
    if failed:
        raise SystemExit(f"segmentation failed with {model} {options}: {failed}")
    labels = {Path(r.input).name: np.asarray(read_scan(r.outputs["nifti"]).array[0]) for r in report.records}
    return labels, seconds
