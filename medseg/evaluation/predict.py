"""Predictions for a manifest split through ``medseg segment``'s code path, so that
``medseg evaluate --model`` measures exactly what users get."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.data.manifest import load_manifest
from medseg.errors import MedsegError
from medseg.evaluation.report import prediction_path
from medseg.inference import make_predictor, segment_scan
from medseg.inference.predictor import Progress
from medseg.model import Model

logger = logging.getLogger(__name__)


def predict_split(
    model: Model,
    manifest_path: Path,
    pred_dir: Path,
    split: str = "validation",
    data_root: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Segment every image of ``split`` with ``model`` into ``pred_dir``, named as
    ``medseg segment`` names them; ``progress(done, total)`` is called after each case.

    Returns case id -> why its segmentation failed; the other cases are written. A case's
    earlier prediction in ``pred_dir`` is removed first, so a failure never leaves a stale
    one to be evaluated in its place.
    """
    manifest = load_manifest(manifest_path, data_root, check=False)
    predictor = make_predictor(model)
    failures: dict[str, str] = {}
    cases = manifest.cases(split)
    for done, case in enumerate(cases, start=1):
        prediction_path(case, pred_dir).unlink(missing_ok=True)
        try:
            segment_scan(case.image, predictor, pred_dir)
        except MedsegError as err:
            failures[case.id] = str(err)
            logger.warning("case %s: segmentation failed: %s", case.id, err)
        if progress is not None:
            progress(done, len(cases))
    return failures
