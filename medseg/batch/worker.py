"""One scan's work: read + preprocess -> infer -> write each format (atomically) -> record.

A :class:`ScanWorker` holds a loaded predictor and does this for the scans it is handed;
it knows nothing of the run around it (which scans, the report, resume), so the same
worker serves the local executor (:func:`segment_overlapped`, three threads in this
process) and each actor of the Ray executor (``medseg.batch.ray_executor``). Whatever goes
wrong with a scan becomes that scan's failed record, naming the stage, the error and a hint.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.batch.checks import label_volumes_ml, result_warnings
from medseg.batch.report import ScanRecord
from medseg.errors import FileProblem
from medseg.inference.options import Progress
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor
from medseg.inference.segment import PreparedScan, predict_labels, predict_labels_and_probabilities, prepare
from medseg.io.discover import ScanSource, read_source
from medseg.io.formats import FORMATS, Segmentation, WriteOptions, output_files, write_outputs
from medseg.io.volume import Volume
from medseg.transforms.intensity import per_voxel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanTask:
    """A scan to segment, as the run planned it: ``input_key`` and ``fingerprint`` identify
    its input files and the run's settings when planned (its record keeps them, for resume);
    ``stale`` names outputs an earlier run left for it (a failure says they remain)."""

    scan: ScanSource
    input_key: str = ""
    fingerprint: str = ""
    stale: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Prepared:
    """A scan read and preprocessed (in the reader thread) that waits for the network.

    ``volume`` is the scan as read when a format shows its voxels, else the scan with its
    voxels let go (``Volume.without_voxels``): they are ``prepared.image``'s now."""

    task: ScanTask
    volume: Volume
    prepared: PreparedScan
    timings: dict[str, float]


@dataclass(frozen=True)
class _Job:
    """A scan whose labels are computed and wait to be written."""

    task: ScanTask
    volume: Volume
    labels: np.ndarray
    probabilities: np.ndarray | None
    timings: dict[str, float]


class DiskFull(FileProblem):
    """The output folder's disk filled up: the run stops (finished records are kept)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(
            out_dir,
            "the disk is full: the run stopped; scans finished before are written and in the report",
            "free some space, then run the same command again to go on",
        )


class ScanWorker:
    """Reads, segments and writes scans into ``out_dir`` with one loaded ``predictor``.

    ``formats`` and ``write`` say what to write. ``disk_full`` turns true when a write hit
    a full disk: going on cannot help, so whoever runs the worker stops handing it scans.
    """

    def __init__(
        self,
        predictor: SlicePredictor | EnsemblePredictor,
        out_dir: Path,
        formats: tuple[str, ...],
        write: WriteOptions,
    ) -> None:
        self.predictor = predictor
        self.out_dir = Path(out_dir)
        self.formats = formats
        self.write_options = write
        self.disk_full = False

    @property
    def needs_voxels(self) -> bool:
        """Whether a format shows the scan's voxels as read (else they are preprocessed in place)."""
        return any(FORMATS[name].needs_voxels for name in self.formats)

    @property
    def needs_probabilities(self) -> bool:
        return any(FORMATS[name].needs_probabilities for name in self.formats)

    def segment(self, task: ScanTask, slice_progress: Progress | None = None) -> ScanRecord:
        """Read, segment and write ``task``'s scan in this thread; its record."""
        job = self.infer(self.read(task), slice_progress)
        return job if isinstance(job, ScanRecord) else self.write(job)

    def read(self, task: ScanTask) -> _Prepared | ScanRecord:
        """Read and preprocess the scan (in the reader thread); a failed record names the stage.

        The voxels are preprocessed in place (one volume per scan) unless a format shows them
        as read; then preprocessing works on a copy. A file's stored int16 (CT) stays int16
        when the model's preset maps each voxel on its own (a CT window, applied per slice
        batch): half the memory of float32, the same network input.
        """
        start = time.perf_counter()
        keep = self.needs_voxels
        try:
            volume = read_source(task.scan, integers=not keep and per_voxel(self.predictor.model.spec.preset))
        except Exception as err:  # one scan's failure must never stop the batch
            return failed_record(task, "read", err, time.perf_counter() - start)
        read_s = time.perf_counter() - start
        try:
            prepared = prepare(volume, self.predictor.model.spec, inplace=not keep)
        except Exception as err:  # one scan's failure must never stop the batch
            return failed_record(task, "preprocess", err, time.perf_counter() - start)
        timings = {"read": read_s, "preprocess": time.perf_counter() - start - read_s}
        return _Prepared(task, volume if keep else volume.without_voxels(), prepared, timings)

    def infer(self, item: _Prepared | ScanRecord, slice_progress: Progress | None = None) -> _Job | ScanRecord:
        """Run the network on a read scan: a _Job to write, or a failed record."""
        if isinstance(item, ScanRecord):
            return item
        start = time.perf_counter()
        try:
            probabilities = None
            if self.needs_probabilities:
                labels, probabilities = predict_labels_and_probabilities(item.prepared, self.predictor, slice_progress)
            else:
                labels = predict_labels(item.prepared, self.predictor, slice_progress)
        except Exception as err:  # one scan's failure must never stop the batch
            seconds = sum(item.timings.values()) + time.perf_counter() - start
            return failed_record(item.task, "infer", err, seconds)
        timings = {**item.timings, "infer": time.perf_counter() - start}
        return _Job(item.task, item.volume, labels, probabilities, timings)

    def write(self, job: _Job) -> ScanRecord:
        """Write the formats (each atomically) and make the scan's record."""
        scan, volume = job.task.scan, job.volume
        spec = self.predictor.model.spec
        paths = self.planned(scan)
        seg = Segmentation(job.labels, volume, spec.labels, spec.name, scan.series, job.probabilities)
        before = _stamps(paths.values())
        start = time.perf_counter()
        try:
            warnings = [*volume.notes, *write_outputs(seg, self.formats, paths, self.write_options)]
        except Exception as err:  # one scan's failure must never stop the batch
            _remove_written(paths.values(), before)  # a failed record leaves no unnamed file
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                self.disk_full = True
            return failed_record(job.task, "write", err, sum(job.timings.values()) + time.perf_counter() - start)
        modality = scan.series.slices[0].modality if scan.series is not None else ""
        warnings += result_warnings(job.labels, volume, spec, modality)
        if not paths:
            warnings.append(f"nothing written: --formats {','.join(self.formats)} is written for DICOM inputs only")
        timings = {**job.timings, "write": time.perf_counter() - start}
        return ScanRecord(
            **base_fields(scan),
            status="ok",
            shape=tuple(volume.geometry.shape),
            spacing=tuple(round(s, 6) for s in volume.geometry.spacing),
            outputs={k: str(v) for k, v in paths.items() if v.is_file()},
            seconds=round(sum(timings.values()), 3),
            timings={k: round(v, 4) for k, v in timings.items()},
            warnings=tuple(warnings),
            input_key=job.task.input_key,
            fingerprint=job.task.fingerprint,
            volumes_ml=label_volumes_ml(job.labels, volume, spec),
        )

    def planned(self, scan: ScanSource) -> dict[str, Path]:
        """The output files of ``scan``, by output key."""
        labels = self.predictor.model.spec.labels
        return output_files(self.formats, scan.name, self.out_dir, labels, scan.series is not None)


def failed_record(task: ScanTask, stage: str, err: Exception, seconds: float, hint: str = "") -> ScanRecord:
    """A failed record: the stage, the error without its hint, and the hint said once."""
    # Said to the user once, by whoever shows the records (the CLI's per-scan line).
    logger.debug("%s: failed at %s", task.scan.name, stage, exc_info=err)
    stale = task.stale
    return ScanRecord(
        **base_fields(task.scan),
        status="failed",
        stage=stage,
        error=_error_text(err),
        hint=hint or _hint(err),
        seconds=round(seconds, 3),
        # A failure never lets an older result pass for this one unmentioned.
        warnings=(f"outputs of an earlier run remain and are stale: {', '.join(stale)}",) if stale else (),
    )


def base_fields(scan: ScanSource) -> dict:
    """The fields every record of ``scan`` has, whatever became of it."""
    return {
        "name": scan.name,
        "input": str(scan.path),
        "kind": scan.kind,
        "series_uid": scan.series.uid if scan.series is not None else "",
        "description": scan.description,
    }


def segment_overlapped(
    worker: ScanWorker,
    tasks: list[ScanTask],
    finish: Callable[[ScanRecord], None],
    slice_progress: Progress | None = None,
) -> None:
    """Segment ``tasks`` in order with ``worker``, passing each one's record to ``finish``.

    Reading and preprocessing the next scan, and writing the previous one, overlap with
    the network: the main thread only runs the network (and puts its labels back on the
    scan's grid). File decompression, pixel decoding and the in-place array operations
    of preprocessing release the GIL, so they run while the network does. The writer
    thread hands each record to ``finish`` as soon as its files are in place; at most one
    written scan waits, so memory holds at most three scans (one of them as labels only).
    Stops early when the worker's disk is full (the scan just segmented is not recorded).
    """
    with (
        ThreadPoolExecutor(1, thread_name_prefix="medseg-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="medseg-write") as writer,
    ):
        reads = {0: reader.submit(worker.read, tasks[0])} if tasks else {}
        writing: Future | None = None
        for i in range(len(tasks)):
            if worker.disk_full:
                break
            if i + 1 < len(tasks):
                reads[i + 1] = reader.submit(worker.read, tasks[i + 1])
            job = worker.infer(reads.pop(i).result(), slice_progress)  # read never raises
            if writing is not None:
                writing.result()  # re-raises a failure to write the report itself
            if worker.disk_full:
                break  # the scan just segmented is not written (nor recorded): the disk is full
            if isinstance(job, _Job):
                writing = writer.submit(lambda j: finish(worker.write(j)), job)
            else:
                writing = None
                finish(job)  # a failure: its record needs no writing
        if writing is not None:
            writing.result()


def _hint(err: Exception) -> str:
    if isinstance(err, FileProblem):
        return err.hint
    if isinstance(err, MemoryError):
        return "not enough memory for this scan: close other programs or use a smaller --batch-size"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "the disk is full: free some space, then run the same command again"
    if isinstance(err, OSError):
        return "check permissions and free space of the input and output folders"
    return "unexpected: please report it with this run report"


def _error_text(err: Exception) -> str:
    """The error without its hint (the record keeps the hint in its own field, said once)."""
    if isinstance(err, FileProblem):
        return f"{type(err).__name__}: {err.path}: {err.problem}"
    if isinstance(err, OSError) and err.filename:
        return f"{type(err).__name__}: {Path(err.filename).name}: {err.strerror or err}"
    return f"{type(err).__name__}: {err}"


def _stamps(paths: Iterable[Path]) -> dict[Path, int | None]:
    """Modification time (ns) of each path, None where it does not exist."""
    return {p: p.stat().st_mtime_ns if p.is_file() else None for p in paths}


def _remove_written(paths: Iterable[Path], before: dict[Path, int | None]) -> None:
    """Delete the files among ``paths`` that were written since ``before`` (this attempt's)."""
    for path, stamp in _stamps(paths).items():
        if stamp is not None and stamp != before.get(path):
            path.unlink(missing_ok=True)
