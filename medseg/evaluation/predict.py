"""Predictions for a manifest split through ``medseg.segment``, so that
``medseg evaluate --model`` measures exactly what users get."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.batch.progress import RunProgress
from medseg.batch.report import RunReport
from medseg.batch.run import segment
from medseg.data.manifest import load_manifest
from medseg.io.discover import ScanInput
from medseg.model import Model

logger = logging.getLogger(__name__)


def predict_split(
    model: Model | Path,
    manifest_path: Path,
    pred_dir: Path,
    split: str = "validation",
    data_root: Path | None = None,
    progress: RunProgress | None = None,
) -> RunReport:
    """Segment every image of ``split`` with ``model`` into ``pred_dir`` (NIfTI label maps),
    as ``medseg segment`` does: same names, resume, and a run report that ``evaluate``
    reads to find each case's prediction or why it failed."""
    manifest = load_manifest(manifest_path, data_root, check=False)
    # A missing image is the manifest's problem, reported per case by evaluate; the
    # others are still segmented.
    cases = [c for c in manifest.cases(split) if c.image.exists()]
    inputs = [ScanInput(case.image, case.series_uid) for case in cases]
    return segment(inputs, pred_dir, model, formats=("nifti",), progress=progress)
