"""Segment discovered scans with one loaded model; survive anything in the folder.

for each scan: read + preprocess -> infer -> write each format (atomically) -> record.
One failing scan never stops the run: its record holds the stage, the error and a hint.
A scan done before with the same inputs, model and options is kept (resume); ``overwrite``
redoes everything. Each record reaches the report, and the caller's progress, as soon as
that scan's outputs are renamed into place (from the writer thread), not one scan later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.batch.checks import label_volumes_ml, result_warnings
from medseg.batch.progress import RunProgress
from medseg.batch.qc import write_index
from medseg.batch.report import RunReport, ScanRecord, environment, input_key, load_records
from medseg.errors import FileProblem, MedsegError
from medseg.inference.options import Progress
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor, how_it_runs
from medseg.inference.segment import PreparedScan, predict_labels, predict_labels_and_probabilities, prepare
from medseg.io.discover import Discovery, ScanSource, read_source
from medseg.io.files import process_alive, stale_temporary
from medseg.io.formats import (
    DEFAULT_FORMATS,
    FORMATS,
    Segmentation,
    WriteOptions,
    output_files,
    parse_formats,
    write_outputs,
)
from medseg.io.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOptions:
    """``formats`` to write (names in ``medseg.io.formats.FORMATS``); ``overwrite`` redoes
    finished scans; ``shard`` (i, n) keeps scans i, i+n, i+2n, ... of the sorted discovery;
    ``write`` holds the formats' own settings."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    write: WriteOptions = field(default_factory=WriteOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_formats(self.formats))
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")

    @property
    def needs_probabilities(self) -> bool:
        return any(FORMATS[name].needs_probabilities for name in self.formats)

    @property
    def needs_voxels(self) -> bool:
        """Whether a format shows the scan's voxels as read (else they are preprocessed in place)."""
        return any(FORMATS[name].needs_voxels for name in self.formats)

    @property
    def report_name(self) -> str:
        index, count = self.shard
        return "medseg-run.json" if count == 1 else f"medseg-run.part{index}of{count}.json"


def remove_stale_temporaries(out_dir: Path, finals: set[str]) -> None:
    """Delete the temporary files a killed run left for the outputs named ``finals``.

    Only medseg's own temporary names, of processes that are gone, for this run's files
    qualify: a user's file, or another process's write in flight, is left alone.
    """
    for tmp in out_dir.glob(".*.tmp*"):
        if stale_temporary(tmp) in finals:
            logger.info("removing %s left by an interrupted run", tmp.name)
            tmp.unlink(missing_ok=True)


def fingerprint(key: str, model_hash: str, options: BatchOptions) -> str:
    """Changes when the input files (``key``, see ``input_key``), the model or the output
    options change."""
    write = options.write
    text = f"{key}|{model_hash}|{sorted(options.formats)}|{write.dicom_seg_type}|{write.probability_encoding}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


@dataclass(frozen=True)
class _Prepared:
    """A scan read and preprocessed (in the reader thread) that waits for the network.

    ``volume`` is the scan as read when a format shows its voxels, else the scan with its
    voxels let go (``Volume.without_voxels``): they are ``prepared.image``'s now."""

    scan: ScanSource
    volume: Volume
    prepared: PreparedScan
    timings: dict[str, float]


@dataclass(frozen=True)
class _Job:
    """A scan whose labels are computed and wait to be written."""

    scan: ScanSource
    volume: Volume
    labels: np.ndarray
    probabilities: np.ndarray | None
    timings: dict[str, float]


class BatchRunner:
    """Runs one predictor over discovered scans, writing outputs and the report in ``out_dir``."""

    def __init__(
        self,
        predictor: SlicePredictor | EnsemblePredictor,
        out_dir: Path,
        options: BatchOptions = BatchOptions(),
        model_hash: str = "",
    ) -> None:
        self.predictor = predictor
        self.out_dir = Path(out_dir)
        self.options = options
        self.model_hash = model_hash
        self._keys: dict[str, tuple[str, str]] = {}  # scan name -> (input key, fingerprint), when planned
        self._lock = threading.Lock()  # records arrive from the main and the writer thread
        self._stop: Exception | None = None  # set when going on cannot help (a full disk)
        self._previous: dict[str, ScanRecord] = {}  # the earlier run's records in out_dir

    @property
    def report_name(self) -> str:
        return self.options.report_name

    def run(self, discovery: Discovery, progress: RunProgress | None = None) -> RunReport:
        """Segment this shard's scans (those done before with the same inputs are kept); the
        report is rewritten after every scan so an interrupted run leaves an accurate one."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with _run_lock(self.out_dir, self.report_name):
            return self._run(discovery, progress)

    def _run(self, discovery: Discovery, progress: RunProgress | None) -> RunReport:
        progress = progress or RunProgress()
        index, count = self.options.shard
        mine = discovery.scans[index::count]
        report = self._new_report(discovery, mine)
        self._previous = load_records(self.out_dir, self.report_name)
        previous = {} if self.options.overwrite else self._previous
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir, self._finals(mine))
        self._save(report)  # the run is on record before its first scan
        progress.run_started(len(mine))

        def finish(record: ScanRecord) -> None:
            with self._lock:
                report.records.append(record)
                try:
                    self._save(report)
                except MedsegError:
                    if record.status == "ok":  # its files must not outlive the missing record
                        for path in record.outputs.values():
                            Path(path).unlink(missing_ok=True)
                    raise
                progress.scan_done(record)

        todo = []
        for scan in mine:
            done = self._done_before(scan, previous.get(scan.name))
            if done is not None:
                finish(done)
            else:
                todo.append(scan)
        self._segment_overlapped(todo, finish, progress.slices_done)
        report.seconds = round(time.perf_counter() - report.started, 3)
        if self._stop is not None:
            raise self._stop  # the report holds every record finished so far
        report.settings["complete"] = True  # a merge of shard parts waits for this
        self._save(report)
        if "qc" in self.options.formats:
            write_index(report, self.out_dir)
        return report

    def _save(self, report: RunReport) -> None:
        """Write the report; a failure to do so ends the run with a message naming the file."""
        try:
            report.write(self.out_dir, self.report_name)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskFull(self.out_dir) from err
            raise FileProblem(
                self.out_dir / self.report_name,
                f"cannot be written ({err.strerror or err})",
                "check that the output folder is writable and has free space",
            ) from err

    def _planned(self, scan: ScanSource) -> dict[str, Path]:
        """The output files of ``scan``, by output key."""
        labels = self.predictor.model.spec.labels
        return output_files(self.options.formats, scan.name, self.out_dir, labels, scan.series is not None)

    def _finals(self, scans: tuple[ScanSource, ...]) -> set[str]:
        """File names this run may write: its scans' outputs and its report."""
        names = {p.name for scan in scans for p in self._planned(scan).values()}
        report = Path(self.report_name)
        return names | {report.name, report.with_suffix(".csv").name, "index.html"}

    def _new_report(self, discovery: Discovery, mine: tuple[ScanSource, ...]) -> RunReport:
        index, count = self.options.shard
        return RunReport(
            skipped_files=[{"path": str(s.path), "reason": s.reason} for s in discovery.skipped],
            settings={
                **environment(),
                "input": str(discovery.root),
                "model": str(self.predictor.model.folder),
                "model_sha256": self.model_hash,
                **how_it_runs(self.predictor),  # device, engine, precision ("auto" resolved)
                "formats": list(self.options.formats),
                "shard": f"{index}/{count}",
                "plan": _plan_key(discovery, self.options, self.model_hash),
            },
            notes=self._run_notes(mine),
            path=self.out_dir / self.report_name,
        )

    def _run_notes(self, scans: tuple[ScanSource, ...]) -> list[str]:
        """Conditions that hold for the run rather than one scan, said once (and logged)."""
        notes = []
        for name in self.options.formats:
            not_dicom = sum(s.series is None for s in scans)
            if FORMATS[name].dicom_only and not_dicom:
                notes.append(
                    f"{name}: written for DICOM inputs only; {not_dicom} of {len(scans)} scan(s) are not DICOM"
                )
        for note in notes:
            logger.warning("%s", note)
        return notes

    def _segment_overlapped(
        self, scans: list[ScanSource], finish: Callable[[ScanRecord], None], slice_progress: Progress
    ) -> None:
        """Segment ``scans`` in order, passing each one's record to ``finish``.

        Reading and preprocessing the next scan, and writing the previous one, overlap with
        the network: the main thread only runs the network (and puts its labels back on the
        scan's grid). File decompression, pixel decoding and the in-place array operations
        of preprocessing release the GIL, so they run while the network does. The writer
        thread hands each record to ``finish`` as soon as its files are in place; at most one
        written scan waits, so memory holds at most three scans (one of them as labels only).
        """
        with (
            ThreadPoolExecutor(1, thread_name_prefix="medseg-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="medseg-write") as writer,
        ):
            reads = {0: reader.submit(self._read, scans[0])} if scans else {}
            writing: Future | None = None
            for i in range(len(scans)):
                if self._stop is not None:
                    break
                if i + 1 < len(scans):
                    reads[i + 1] = reader.submit(self._read, scans[i + 1])
                job = self._infer(reads.pop(i), slice_progress)
                if writing is not None:
                    writing.result()  # re-raises a failure to write the report itself
                if self._stop is not None:
                    break  # the scan just segmented is not written (nor recorded): the disk is full
                if isinstance(job, _Job):
                    writing = writer.submit(lambda j: finish(self._finish_write(j)), job)
                else:
                    writing = None
                    finish(job)  # a failure: its record needs no writing
            if writing is not None:
                writing.result()

    def _base(self, scan: ScanSource) -> dict:
        return {
            "name": scan.name,
            "input": str(scan.path),
            "kind": scan.kind,
            "series_uid": scan.series.uid if scan.series is not None else "",
            "description": scan.description,
        }

    def _failed(self, scan: ScanSource, stage: str, err: Exception, seconds: float) -> ScanRecord:
        # Said to the user once, by whoever shows the records (the CLI's per-scan line).
        logger.debug("%s: failed at %s", scan.name, stage, exc_info=err)
        stale = self._stale_outputs(scan)
        return ScanRecord(
            **self._base(scan),
            status="failed",
            stage=stage,
            error=_error_text(err),
            hint=_hint(err),
            seconds=round(seconds, 3),
            # A failure never lets an older result pass for this one unmentioned.
            warnings=(f"outputs of an earlier run remain and are stale: {', '.join(stale)}",) if stale else (),
        )

    def _stale_outputs(self, scan: ScanSource) -> list[str]:
        """Names of the files an earlier run wrote for ``scan`` that are still on disk."""
        before = self._previous.get(scan.name)
        return [Path(p).name for p in before.outputs.values() if Path(p).is_file()] if before else []

    def _done_before(self, scan: ScanSource, before: ScanRecord | None) -> ScanRecord | None:
        """The earlier record, marked skipped, when this scan needs no redoing."""
        try:
            files_key = input_key(list(scan.files))  # slices, or a header and its data file
        except OSError:
            return None  # unreadable now: the read stage will say why
        key = fingerprint(files_key, self.model_hash, self.options)
        # The inputs as they were when the scan was planned: its record keeps these keys.
        self._keys[scan.name] = (files_key, key)
        if before is None or before.status not in ("ok", "skipped") or before.fingerprint != key:
            return None
        expected = [Path(p) for p in before.outputs.values()]
        if not expected or not all(p.is_file() and p.stat().st_size > 0 for p in expected):
            return None  # an output was removed or emptied since: redo the scan
        logger.debug("%s: done before, skipped", scan.name)
        return dataclasses.replace(before, status="skipped")

    def _read(self, scan: ScanSource) -> _Prepared | ScanRecord:
        """Read and preprocess ``scan`` (in the reader thread); a failed record names the stage.

        The voxels are preprocessed in place (one float32 volume per scan) unless a format
        shows them as read; then preprocessing works on a copy.
        """
        start = time.perf_counter()
        try:
            volume = read_source(scan)
        except Exception as err:  # one scan's failure must never stop the batch
            return self._failed(scan, "read", err, time.perf_counter() - start)
        read_s = time.perf_counter() - start
        keep = self.options.needs_voxels
        try:
            prepared = prepare(volume, self.predictor.model.spec, inplace=not keep)
        except Exception as err:  # one scan's failure must never stop the batch
            return self._failed(scan, "preprocess", err, time.perf_counter() - start)
        timings = {"read": read_s, "preprocess": time.perf_counter() - start - read_s}
        return _Prepared(scan, volume if keep else volume.without_voxels(), prepared, timings)

    def _infer(self, read: Future, slice_progress: Progress) -> _Job | ScanRecord:
        """Wait for the scan's read and preprocessing, run the network; a _Job to write, or a
        failed record."""
        item = read.result()  # _read returns failures as records, never raises
        if isinstance(item, ScanRecord):
            return item
        start = time.perf_counter()
        try:
            probabilities = None
            if self.options.needs_probabilities:
                labels, probabilities = predict_labels_and_probabilities(item.prepared, self.predictor, slice_progress)
            else:
                labels = predict_labels(item.prepared, self.predictor, slice_progress)
        except Exception as err:  # one scan's failure must never stop the batch
            seconds = sum(item.timings.values()) + time.perf_counter() - start
            return self._failed(item.scan, "infer", err, seconds)
        timings = {**item.timings, "infer": time.perf_counter() - start}
        return _Job(item.scan, item.volume, labels, probabilities, timings)

    def _finish_write(self, job: _Job) -> ScanRecord:
        scan, volume = job.scan, job.volume
        spec = self.predictor.model.spec
        paths = self._planned(scan)
        seg = Segmentation(job.labels, volume, spec.labels, spec.name, scan.series, job.probabilities)
        before = _stamps(paths.values())
        start = time.perf_counter()
        try:
            warnings = [*volume.notes, *write_outputs(seg, self.options.formats, paths, self.options.write)]
        except Exception as err:  # one scan's failure must never stop the batch
            _remove_written(paths.values(), before)  # a failed record leaves no unnamed file
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                self._stop = DiskFull(self.out_dir)
            return self._failed(scan, "write", err, sum(job.timings.values()) + time.perf_counter() - start)
        modality = scan.series.slices[0].modality if scan.series is not None else ""
        warnings += result_warnings(job.labels, volume, spec, modality)
        if not paths:
            warnings.append(
                f"nothing written: --formats {','.join(self.options.formats)} is written for DICOM inputs only"
            )
        timings = {**job.timings, "write": time.perf_counter() - start}
        files_key, key = self._keys.pop(scan.name, ("", ""))
        return ScanRecord(
            **self._base(scan),
            status="ok",
            shape=tuple(volume.geometry.shape),
            spacing=tuple(round(s, 6) for s in volume.geometry.spacing),
            outputs={k: str(v) for k, v in paths.items() if v.is_file()},
            seconds=round(sum(timings.values()), 3),
            timings={k: round(v, 4) for k, v in timings.items()},
            warnings=tuple(warnings),
            input_key=files_key,
            fingerprint=key,
            volumes_ml=label_volumes_ml(job.labels, volume, spec),
        )


@contextlib.contextmanager
def _run_lock(out_dir: Path, report_name: str) -> Iterator[None]:
    """One run at a time per report in ``out_dir``: two runs of the same scans into one folder
    would overwrite each other's outputs and report. Shards have reports of their own. A lock
    left by a process that is gone (killed) is taken over."""
    lock = out_dir / f".{report_name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None:
                raise FileProblem(
                    out_dir,
                    f"another medseg run (process {owner}) is writing {report_name} here",
                    "wait for it to finish, use another output folder, or split one run with --shard I/N",
                ) from None
            lock.unlink(missing_ok=True)  # its process is gone
    else:
        raise FileProblem(out_dir, "its run lock cannot be taken", f"remove {lock.name} if no medseg run is active")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> int | None:
    """The pid holding ``lock`` when that process still runs, else None."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and process_alive(pid) else None


def _plan_key(discovery: Discovery, options: BatchOptions, model_hash: str) -> str:
    """Identifies the whole run every shard belongs to (all scans, model, formats): shard
    parts are merged only when they share it, never with a part left by another run."""
    scans = "\n".join(f"{s.name}|{s.path}" for s in discovery.scans)
    text = f"{scans}|{model_hash}|{sorted(options.formats)}|{options.shard[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DiskFull(FileProblem):
    """The output folder's disk filled up: the run stops (finished records are kept)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(
            out_dir,
            "the disk is full: the run stopped; scans finished before are written and in the report",
            "free some space, then run the same command again to go on",
        )


def _stamps(paths: Iterable[Path]) -> dict[Path, int | None]:
    """Modification time (ns) of each path, None where it does not exist."""
    return {p: p.stat().st_mtime_ns if p.is_file() else None for p in paths}


def _remove_written(paths: Iterable[Path], before: dict[Path, int | None]) -> None:
    """Delete the files among ``paths`` that were written since ``before`` (this attempt's)."""
    for path, stamp in _stamps(paths).items():
        if stamp is not None and stamp != before.get(path):
            path.unlink(missing_ok=True)
