"""``medseg evaluate``: predictions against a manifest's labels, per case and per label.

Writes ``metrics.csv`` (one row per case and label), ``summary.json`` (mean, median, std
per label and every problem), ``summary.md`` (a Markdown table) and ``dice_boxplot.png``.
A missing prediction, one on another grid or one with unexpected label values is reported
for its case, never skipped silently.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.batch.report import input_key, load_records
from medseg.data.manifest import Case, load_manifest
from medseg.errors import FileProblem, MedsegError
from medseg.evaluation.metrics import dice, surface_metrics
from medseg.io import read_scan
from medseg.io.discover import ScanSource, single_scan

logger = logging.getLogger(__name__)

METRICS = ("dice", "hd95_mm", "nsd")


@dataclass(frozen=True)
class Evaluation:
    rows: list[dict[str, Any]]
    problems: list[str]
    summary: dict[str, dict[str, float]] = field(default_factory=dict)


class Predictions:
    """Where ``medseg segment`` put each case's label map in ``pred_dir``.

    The run report (``medseg-run.json``) maps each input scan to its outputs, whatever the
    input kind and however the scans were passed (one by one or as a folder tree); without
    a report, a case's prediction is ``<name>.nii.gz`` with the name ``medseg segment``
    gives that scan when it is segmented on its own (one naming rule, ``medseg.io.discover``).
    A case whose record says it failed is reported as failed, never scored from an older file.
    """

    def __init__(self, pred_dir: Path) -> None:
        self.pred_dir = Path(pred_dir)
        self.records = {(str(Path(r.input).resolve()), r.series_uid): r for r in load_records(self.pred_dir).values()}

    def find(self, case: Case) -> Path:
        """The case's prediction file; MedsegError saying why there is none."""
        scan = single_scan(case.image, case.series_uid)
        key = (str(scan.path.resolve()), scan.series.uid if scan.series is not None else "")
        record = self.records.get(key)
        if record is None:
            path = self.pred_dir / f"{scan.name}.nii.gz"
            if not path.is_file():
                raise MedsegError(f"prediction {path} is missing")
            return path
        if record.status == "failed":
            raise MedsegError(f"segmentation failed at {record.stage}: {record.error} ({record.hint})")
        if record.input_key and record.input_key != _input_key(scan):
            raise MedsegError(
                f"{case.image} changed after it was segmented into {record.name}: the prediction is stale; "
                "segment it again (the same medseg segment command redoes it)"
            )
        if "nifti" not in record.outputs:
            raise MedsegError(f"{record.name} was segmented without the nifti format; re-run with --formats nifti")
        return Path(record.outputs["nifti"])


def _input_key(scan: ScanSource) -> str:
    try:
        return input_key(list(scan.files))
    except OSError:
        return ""


def evaluate_case(
    case: Case, predictions: Predictions, labels: dict[int, str], tolerance_mm: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows (one per foreground label) for ``case``, or a problem sentence."""
    try:
        path = predictions.find(case)
        pred_volume, ref_volume = read_scan(path), read_scan(case.label)
    except MedsegError as err:
        return [], f"case {case.id}: {err}"
    mismatch = ref_volume.geometry.mismatch(pred_volume.geometry, atol=1e-3)
    if mismatch:
        return (
            [],
            f"case {case.id}: prediction {path.name} is on another grid than the label ({mismatch})",
        )
    pred = np.rint(pred_volume.array[0]).astype(np.int64)
    ref = np.rint(ref_volume.array[0]).astype(np.int64)
    unexpected = sorted(set(np.unique(pred).tolist()) - set(labels))
    if unexpected:
        return (
            [],
            f"case {case.id}: prediction has label values {unexpected} not in {sorted(labels)}",
        )
    rows = []
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        hd95, nsd = surface_metrics(pred, ref, value, ref_volume.geometry.spacing, tolerance_mm)
        rows.append(
            {
                "case": case.id,
                "label": name,
                "dice": dice(pred, ref, value),
                "hd95_mm": hd95,
                "nsd": nsd,
            }
        )
    return rows, None


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        for metric in METRICS:
            values = np.asarray([r[metric] for r in mine], dtype=float)
            finite = values[np.isfinite(values)]
            out.setdefault(label, {})
            out[label][f"{metric}_mean"] = float(finite.mean()) if finite.size else math.nan
            out[label][f"{metric}_median"] = float(np.median(finite)) if finite.size else math.nan
            out[label][f"{metric}_std"] = float(finite.std()) if finite.size else math.nan
        out[label]["cases"] = len(mine)
    return out


def evaluate(
    pred_dir: Path,
    manifest_path: Path,
    out_dir: Path,
    split: str = "validation",
    tolerance_mm: float = 1.0,
    data_root: Path | None = None,
) -> Evaluation:
    """Evaluate every case of ``split`` against ``medseg segment``'s outputs in ``pred_dir``
    (found through its run report, see :class:`Predictions`) and write the report files
    into ``out_dir``."""
    if not Path(pred_dir).is_dir():
        raise FileProblem(pred_dir, "is not a folder of predictions", "give the -o folder of 'medseg segment'")
    manifest = load_manifest(manifest_path, data_root, check=False)
    if not manifest.cases(split):
        raise MedsegError(f"{manifest_path}: the {split} split has no case; choose another --split")
    predictions = Predictions(pred_dir)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for case in manifest.cases(split):
        if case.label is None:
            problems.append(f"case {case.id}: has no label to compare with")
            continue
        case_rows, problem = evaluate_case(case, predictions, manifest.labels, tolerance_mm)
        rows += case_rows
        if problem:
            problems.append(problem)  # listed once, in the summary
            logger.debug("%s", problem)
    result = Evaluation(rows, problems, summarise(rows))
    write_report(result, out_dir, tolerance_mm, split)
    return result


def write_report(result: Evaluation, out_dir: Path, tolerance_mm: float, split: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "label", *METRICS])
        writer.writeheader()
        writer.writerows(result.rows)
    summary = {
        "split": split,
        "nsd_tolerance_mm": tolerance_mm,
        "labels": result.summary,
        "problems": result.problems,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"| label | cases | Dice mean | Dice median | HD95 mean (mm) | NSD@{tolerance_mm:g}mm mean |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in result.summary.items():
        lines.append(
            f"| {label} | {s['cases']} | {s['dice_mean']:.4f} | {s['dice_median']:.4f} | "
            f"{s['hd95_mm_mean']:.2f} | {s['nsd_mean']:.4f} |"
        )
    if result.problems:
        lines += ["", "Problems:", *[f"- {p}" for p in result.problems]]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    if result.rows:
        _boxplot(result.rows, out_dir / "dice_boxplot.png")


def _boxplot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 4))
    ax.boxplot([[r["dice"] for r in rows if r["label"] == lab] for lab in labels], tick_labels=labels)
    ax.set(ylabel="Dice per case", title="Dice by label")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
