"""Segment every scan under a folder with one loaded model; survive anything in the folder.

discover -> for each scan: read -> preprocess + infer -> write each format (atomically)
-> record. One failing scan never stops the run: its record holds the stage, the error
and a hint. Re-running the same command skips scans whose outputs all exist and whose
record matches (input fingerprint, model hash, options); ``overwrite`` redoes everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.batch.qc import write_index, write_montage
from medseg.batch.report import RunReport, ScanRecord, environment, load_records
from medseg.errors import FileProblem
from medseg.inference.predictor import EnsemblePredictor, Progress, SlicePredictor
from medseg.inference.segment import segment_volume, segment_volume_with_probabilities
from medseg.io.dicom_seg import DicomSegUnavailable, write_dicom_seg
from medseg.io.discover import Discovery, ScanSource, discover, read_source, sanitise
from medseg.io.volume import Volume
from medseg.io.writers import write_color_table, write_nifti_labels, write_probability_map, write_seg_nrrd

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "seg.nrrd", "dicom-seg", "qc")


@dataclass(frozen=True)
class BatchOptions:
    """``formats`` to write; ``overwrite`` redoes finished scans; ``shard`` (i, n) keeps
    scans i, i+n, i+2n, ... of the sorted discovery; ``dicom_seg_type`` "binary" (valid for
    every viewer, uncompressed) or "labelmap" (compact, newer SOP class); ``probabilities``
    "uint8" or "float32" also writes one probability map per foreground label."""

    formats: tuple[str, ...] = ("nifti", "seg.nrrd")
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    dicom_seg_type: str = "binary"
    probabilities: str | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"unknown output format(s) {unknown}; choose from {FORMATS}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")


def output_paths(
    scan: ScanSource, out_dir: Path, formats: tuple[str, ...], probability_labels: tuple[str, ...] = ()
) -> dict[str, Path]:
    """Output files per format; "dicom-seg" only for DICOM inputs."""
    name = scan.name
    paths: dict[str, Path] = {
        f"prob-{lab}": out_dir / f"{name}.prob-{sanitise(lab)}.nii.gz" for lab in probability_labels
    }
    if "nifti" in formats:
        paths["nifti"] = out_dir / f"{name}.nii.gz"
        paths["color-table"] = out_dir / f"{name}.ctbl"
    if "seg.nrrd" in formats:
        paths["seg.nrrd"] = out_dir / f"{name}.seg.nrrd"
    if "qc" in formats:
        paths["qc"] = out_dir / f"{name}.qc.png"
    if "dicom-seg" in formats and scan.series is not None:
        paths["dicom-seg"] = out_dir / f"{name}.seg.dcm"
    return paths


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files a killed run left (never a finished output: those are renamed)."""
    for tmp in out_dir.glob(".*.tmp*"):
        logger.info("removing %s left by an interrupted run", tmp.name)
        tmp.unlink(missing_ok=True)


def fingerprint(scan: ScanSource, model_hash: str, options: BatchOptions) -> str:
    """Changes when the input files, the model or the output options change."""
    files = [s.path for s in scan.series.slices] if scan.series is not None else [scan.path]
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(f"{model_hash}|{sorted(options.formats)}|{options.dicom_seg_type}|{options.probabilities}".encode())
    return digest.hexdigest()[:16]


def _hint(err: Exception) -> str:
    if isinstance(err, FileProblem):
        return err.hint
    if isinstance(err, MemoryError):
        return "not enough memory for this scan: close other programs or use a smaller --batch-size"
    if isinstance(err, OSError):
        return "check permissions and free space of the input and output folders"
    return "unexpected: please report it with this run report"


@dataclass(frozen=True)
class _Job:
    """A scan whose labels are computed and wait to be written."""

    scan: ScanSource
    volume: Volume
    labels: np.ndarray
    probabilities: np.ndarray | None
    timings: dict[str, float]


def _timed(fn: Callable, *args: object) -> tuple[object, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


class BatchRunner:
    """Runs one model over discovered scans, writing outputs and the report in ``out_dir``."""

    def __init__(
        self,
        predictor: SlicePredictor | EnsemblePredictor,
        out_dir: Path,
        options: BatchOptions = BatchOptions(),
        model_hash: str = "",
    ) -> None:
        self.predictor = predictor
        self.out_dir = out_dir
        self.options = options
        self.model_hash = model_hash
        self._keys: dict[str, str] = {}  # scan name -> input fingerprint, set when planned

    def run(
        self,
        discovery: Discovery,
        progress: Callable[[ScanRecord], None] | None = None,
        slice_progress: Progress | None = None,
    ) -> RunReport:
        """Segment this shard's scans (those done before with the same inputs are kept); the
        report, rewritten after every scan so an interrupted run leaves an accurate one."""
        index, count = self.options.shard
        report = self._new_report(discovery)
        previous = {} if self.options.overwrite else load_records(self.out_dir, self.report_name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)

        def finish(record: ScanRecord) -> None:
            report.records.append(record)
            report.write(self.out_dir, self.report_name)
            if progress is not None:
                progress(record)

        todo = []
        for scan in discovery.scans[index::count]:
            done = self._done_before(scan, previous.get(scan.name))
            if done is not None:
                finish(done)
            else:
                todo.append(scan)
        self._segment_overlapped(todo, finish, slice_progress)
        report.settings["complete"] = True  # a merge of shard parts waits for this
        report.write(self.out_dir, self.report_name)
        if "qc" in self.options.formats:
            write_index(report, self.out_dir)
        return report

    def _new_report(self, discovery: Discovery) -> RunReport:
        index, count = self.options.shard
        return RunReport(
            skipped_files=[{"path": str(s.path), "reason": s.reason} for s in discovery.skipped],
            settings={
                **environment(),
                "input": str(discovery.root),
                "model": str(self.predictor.model.folder),
                "model_sha256": self.model_hash,
                "device": str(getattr(self.predictor, "device", "cpu")),
                "formats": list(self.options.formats),
                "shard": f"{index}/{count}",
            },
        )

    def _segment_overlapped(
        self,
        scans: list[ScanSource],
        finish: Callable[[ScanRecord], None],
        slice_progress: Progress | None,
    ) -> None:
        """Segment ``scans`` in order, passing each one's record to ``finish``.

        Reading the next scan and writing the previous one overlap with inference: file
        decompression and pixel decoding release the GIL, so they run while the network does.
        """
        with (
            ThreadPoolExecutor(1, thread_name_prefix="medseg-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="medseg-write") as writer,
        ):
            reads = {0: reader.submit(_timed, read_source, scans[0])} if scans else {}
            writing: Future | None = None
            for i, scan in enumerate(scans):
                if i + 1 < len(scans):
                    reads[i + 1] = reader.submit(_timed, read_source, scans[i + 1])
                job = self._infer(scan, reads.pop(i), slice_progress)
                if writing is not None:
                    finish(writing.result())
                writing = writer.submit(self._finish_write, job) if isinstance(job, _Job) else None
                if not isinstance(job, _Job):
                    finish(job)  # a failure: its record needs no writing
            if writing is not None:
                finish(writing.result())

    @property
    def report_name(self) -> str:
        index, count = self.options.shard
        return "medseg-run.json" if count == 1 else f"medseg-run.part{index}of{count}.json"

    def _base(self, scan: ScanSource) -> dict:
        return {
            "name": scan.name,
            "input": str(scan.path),
            "kind": scan.kind,
            "series_uid": scan.series.uid if scan.series is not None else "",
            "description": scan.description,
        }

    def _failed(self, scan: ScanSource, stage: str, err: Exception, seconds: float) -> ScanRecord:
        logger.error("%s: failed at %s: %s", scan.name, stage, err)
        return ScanRecord(
            **self._base(scan),
            status="failed",
            stage=stage,
            error=f"{type(err).__name__}: {err}",
            hint=_hint(err),
            seconds=round(seconds, 3),
        )

    def _done_before(self, scan: ScanSource, before: ScanRecord | None) -> ScanRecord | None:
        """The earlier record, marked skipped, when this scan needs no redoing."""
        try:
            key = fingerprint(scan, self.model_hash, self.options)
        except OSError:
            return None  # unreadable now: the read stage will say why
        # The inputs as they were when the scan was planned: its record keeps this key.
        self._keys[scan.name] = key
        if before is None or before.status not in ("ok", "skipped") or before.fingerprint != key:
            return None
        expected = [Path(p) for p in before.outputs.values()]
        if not expected or not all(p.is_file() for p in expected):
            return None
        logger.info("%s: done before, skipped", scan.name)
        return dataclasses.replace(before, status="skipped")

    def _infer(self, scan: ScanSource, read: Future, slice_progress: Progress | None) -> _Job | ScanRecord:
        """Wait for the scan's read, run the network; a _Job to write, or a failed record."""
        try:
            volume, read_s = read.result()
        except Exception as err:  # one scan's failure must never stop the batch
            return self._failed(scan, "read", err, 0.0)
        start = time.perf_counter()
        try:
            probabilities = None
            if self.options.probabilities:
                labels, probabilities = segment_volume_with_probabilities(volume, self.predictor, slice_progress)
            else:
                labels = segment_volume(volume, self.predictor, slice_progress)
        except Exception as err:  # one scan's failure must never stop the batch
            return self._failed(scan, "infer", err, read_s + time.perf_counter() - start)
        return _Job(scan, volume, labels, probabilities, {"read": read_s, "infer": time.perf_counter() - start})

    def _finish_write(self, job: _Job) -> ScanRecord:
        scan, volume = job.scan, job.volume
        spec = self.predictor.model.spec
        prob_labels = tuple(lab.name for lab in spec.labels[1:]) if job.probabilities is not None else ()
        outputs = output_paths(scan, self.out_dir, self.options.formats, prob_labels)
        start = time.perf_counter()
        try:
            warnings = self._write(job.labels, volume, scan, outputs)
            for i, lab in enumerate(spec.labels[1:], start=1):
                if job.probabilities is not None:
                    write_probability_map(
                        job.probabilities[i], volume.geometry, outputs[f"prob-{lab.name}"], self.options.probabilities
                    )
        except Exception as err:  # one scan's failure must never stop the batch
            return self._failed(scan, "write", err, sum(job.timings.values()) + time.perf_counter() - start)
        timings = {**job.timings, "write": time.perf_counter() - start}
        return ScanRecord(
            **self._base(scan),
            status="ok",
            shape=tuple(volume.geometry.shape),
            spacing=tuple(round(s, 6) for s in volume.geometry.spacing),
            outputs={k: str(v) for k, v in outputs.items() if v.is_file()},
            seconds=round(sum(timings.values()), 3),
            timings={k: round(v, 4) for k, v in timings.items()},
            warnings=tuple(warnings),
            fingerprint=self._keys.pop(scan.name, ""),
        )

    def _write(self, labels: np.ndarray, volume: Volume, scan: ScanSource, outputs: dict[str, Path]) -> list[str]:
        """Write every requested output; returns warnings (an output that cannot exist)."""
        spec = self.predictor.model.spec
        spec_labels = spec.labels
        warnings = []
        if "nifti" in outputs:
            write_nifti_labels(labels, volume.geometry, outputs["nifti"])
            write_color_table(spec_labels, outputs["color-table"])
        if "seg.nrrd" in outputs:
            write_seg_nrrd(labels, volume.geometry, spec_labels, outputs["seg.nrrd"])
        if "qc" in outputs:
            write_montage(volume, labels, spec_labels, outputs["qc"])
        if "dicom-seg" in self.options.formats and scan.series is None:
            warnings.append("dicom-seg: not written, the input is not DICOM")
        if "dicom-seg" in outputs:
            try:
                write_dicom_seg(
                    labels, scan.series, spec_labels, outputs["dicom-seg"], self.options.dicom_seg_type, spec.name
                )
            except DicomSegUnavailable as err:
                warnings.append(str(err))
        for warning in warnings:
            logger.warning("%s: %s", scan.name, warning)
        return warnings


def run_folder(
    root: Path,
    predictor: SlicePredictor | EnsemblePredictor,
    out_dir: Path,
    options: BatchOptions = BatchOptions(),
    model_hash: str = "",
    progress: Callable[[ScanRecord], None] | None = None,
) -> RunReport:
    """Discover the scans under ``root`` and segment them all (see :class:`BatchRunner`)."""
    return BatchRunner(predictor, out_dir, options, model_hash).run(discover(root), progress)
