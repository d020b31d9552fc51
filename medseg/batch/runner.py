"""Plan a run over discovered scans, hand them to an executor, own the report.

for each scan: done before with the same inputs, model and options? keep its record
(resume; ``overwrite`` redoes everything) : segment it (``medseg.batch.worker``), in this
process or on a Ray cluster. One failing scan never stops the run: its record holds the
stage, the error and a hint. Each record reaches the report, and the caller's progress, as
soon as that scan's outputs are renamed into place (the report file is rewritten then unless
that would take more than a tenth of the run's time: ``_ReportPace``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from medseg.batch.progress import RunProgress
from medseg.batch.qc import write_index
from medseg.batch.report import RunReport, ScanRecord, environment, input_key, load_records
from medseg.batch.worker import DiskFull, ScanTask, ScanWorker, segment_overlapped
from medseg.errors import FileProblem, MedsegError
from medseg.inference.options import Progress
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor, how_it_runs
from medseg.io.discover import Discovery, ScanSource
from medseg.io.files import process_alive, stale_temporary
from medseg.io.formats import DEFAULT_FORMATS, FORMATS, WriteOptions, output_files, parse_formats

if TYPE_CHECKING:
    from medseg.model import Model

__all__ = ["BatchOptions", "BatchRunner", "DiskFull", "Executor", "LocalExecutor", "ScanTask"]

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


def fingerprint(key: str, model_hash: str, options: BatchOptions, numerics: str = "") -> str:
    """Changes when the input files (``key``, see ``input_key``), the model, the output
    options or the arithmetic that shapes the labels (``numerics``: the resolved precision
    and the sliding-window overlap; engines agree exactly, so the engine is left out)
    change."""
    write = options.write
    text = f"{key}|{model_hash}|{sorted(options.formats)}|{write.dicom_seg_type}|{write.probability_encoding}"
    if numerics:
        text += f"|{numerics}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Executor(Protocol):
    """Runs planned scans: in this process (:class:`LocalExecutor`) or on a Ray cluster
    (``medseg.batch.ray_executor.RayExecutor``)."""

    def settings(self) -> dict[str, Any]:
        """How the network runs, for the run report: executor, device, engine, precision
        ("auto" resolved), overlap, and what else the executor wants on record."""
        ...

    def segment(self, tasks: list[ScanTask], finish: Callable[[ScanRecord], None], slice_progress: Progress) -> bool:
        """Segment ``tasks``, passing every record to ``finish`` (one call at a time) as soon
        as its files are in place; True when it stopped early because the disk is full."""
        ...


class LocalExecutor:
    """Scans one after another in this process; reading and writing overlap with the network
    (:func:`~medseg.batch.worker.segment_overlapped`)."""

    def __init__(self, predictor: SlicePredictor | EnsemblePredictor, out_dir: Path, options: BatchOptions) -> None:
        self.worker = ScanWorker(predictor, out_dir, options.formats, options.write)

    def settings(self) -> dict[str, Any]:
        return {"executor": "local", **how_it_runs(self.worker.predictor)}

    def segment(self, tasks: list[ScanTask], finish: Callable[[ScanRecord], None], slice_progress: Progress) -> bool:
        segment_overlapped(self.worker, tasks, finish, slice_progress)
        return self.worker.disk_full


class BatchRunner:
    """Plans a run over discovered scans (which to segment, which were done before), hands
    them to an executor, and owns the report in ``out_dir``."""

    def __init__(self, model: Model, out_dir: Path, options: BatchOptions, executor: Executor) -> None:
        self.model = model
        self.out_dir = Path(out_dir)
        self.options = options
        self.executor = executor
        self.model_hash = model.sha256
        self._lock = threading.Lock()  # records arrive from the main and the writer thread
        self._settings = executor.settings()
        # bf16 labels differ from fp32 ones in a few voxels: a rerun in another precision redoes
        # the scans (a resume on a machine that resolves "auto" alike skips them)
        self._numerics = f"{self._settings['precision']}|{self._settings['overlap']}"

    @property
    def report_name(self) -> str:
        return self.options.report_name

    def run(self, discovery: Discovery, progress: RunProgress | None = None) -> RunReport:
        """Segment this shard's scans (those done before with the same inputs are kept); the
        report is rewritten after every scan so an interrupted run leaves an accurate one.
        Call it holding :func:`run_lock` (taken before the executor starts its workers)."""
        progress = progress or RunProgress()
        index, count = self.options.shard
        mine = discovery.scans[index::count]
        report = self._new_report(discovery, mine)
        earlier = load_records(self.out_dir, self.report_name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        finals = self._finals(mine)
        remove_stale_temporaries(self.out_dir, finals)
        self._save(report)  # the run is on record before its first scan
        progress.run_started(len(mine))

        unsaved: list[ScanRecord] = []  # finished, not yet in the report file
        pace = _ReportPace()

        def save() -> None:
            try:
                with pace.timed():
                    self._save(report)
            except MedsegError:
                for record in unsaved:
                    if record.status == "ok":  # its files must not outlive the missing record
                        for path in record.outputs.values():
                            Path(path).unlink(missing_ok=True)
                raise
            unsaved.clear()

        def finish(record: ScanRecord) -> None:
            with self._lock:
                report.records.append(record)
                unsaved.append(record)
                if pace.due():
                    save()
                progress.scan_done(record)

        try:
            todo = []
            for scan in mine:
                planned = self._plan(scan, earlier.get(scan.name))
                if isinstance(planned, ScanRecord):
                    finish(planned)
                else:
                    todo.append(planned)
            disk_full = self.executor.segment(todo, finish, progress.slices_done)
        finally:  # interrupted or not, every finished record reaches the file
            with self._lock:
                report.seconds = round(time.perf_counter() - report.started, 3)
                save()
        remove_stale_temporaries(self.out_dir, finals)  # of a worker killed while writing
        report.seconds = round(time.perf_counter() - report.started, 3)
        if disk_full:
            raise DiskFull(self.out_dir)  # the report holds every record finished so far
        report.settings["complete"] = True  # a merge of shard parts waits for this
        self._save(report)
        if "qc" in self.options.formats:
            write_index(report, self.out_dir)
        return report

    def _plan(self, scan: ScanSource, before: ScanRecord | None) -> ScanTask | ScanRecord:
        """The task of segmenting ``scan``, or the earlier record, marked skipped, when the
        scan needs no redoing (same inputs, model and options, outputs still there)."""
        stale = tuple(Path(p).name for p in before.outputs.values() if Path(p).is_file()) if before else ()
        try:
            files_key = input_key(list(scan.files))  # slices, or a header and its data file
        except OSError:
            return ScanTask(scan, stale=stale)  # unreadable now: the read stage will say why
        # The inputs as they were when the scan was planned: its record keeps these keys.
        task = ScanTask(scan, files_key, fingerprint(files_key, self.model_hash, self.options, self._numerics), stale)
        if (
            self.options.overwrite
            or before is None
            or before.status not in ("ok", "skipped")
            or before.fingerprint != task.fingerprint
        ):
            return task
        expected = [Path(p) for p in before.outputs.values()]
        if not expected or not all(p.is_file() and p.stat().st_size > 0 for p in expected):
            return task  # an output was removed or emptied since: redo the scan
        logger.debug("%s: done before, skipped", scan.name)
        return dataclasses.replace(before, status="skipped")

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

    def _finals(self, scans: tuple[ScanSource, ...]) -> set[str]:
        """File names this run may write: its scans' outputs and its report."""
        labels, formats = self.model.spec.labels, self.options.formats
        outputs = (output_files(formats, s.name, self.out_dir, labels, s.series is not None) for s in scans)
        names = {path.name for files in outputs for path in files.values()}
        report = Path(self.report_name)
        return names | {report.name, report.with_suffix(".csv").name, "index.html"}

    def _new_report(self, discovery: Discovery, mine: tuple[ScanSource, ...]) -> RunReport:
        index, count = self.options.shard
        return RunReport(
            skipped_files=[{"path": str(s.path), "reason": s.reason} for s in discovery.skipped],
            settings={
                **environment(),
                "input": str(discovery.root),
                "model": str(self.model.folder),
                "model_sha256": self.model_hash,
                **self._settings,  # executor, device, engine, precision ("auto" resolved), overlap
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


class _ReportPace:
    """When to rewrite the report: after every record, unless the report is large (10 ms or
    more to write) and rewriting it would take more than a tenth of the time (a report of
    10,000 records takes ~0.1 s to write), so a run of
    tens of thousands of scans is not slowed by its own report; the records in between are
    written with the next rewrite, and at the end of the run however it ends."""

    SHARE = 0.1
    # Reports cheaper than this (up to ~1,000 records) are rewritten after every record.
    ALWAYS_BELOW_S = 0.01

    def __init__(self) -> None:
        self.last_end = 0.0
        self.last_cost = 0.0

    def due(self) -> bool:
        if self.last_cost < self.ALWAYS_BELOW_S:
            return True
        return time.perf_counter() - self.last_end >= self.last_cost / self.SHARE

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.last_end = time.perf_counter()
        self.last_cost = self.last_end - start


@contextlib.contextmanager
def run_lock(out_dir: Path, report_name: str) -> Iterator[None]:
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
                    f"another medseg run ({owner}) is writing {report_name} here",
                    f"wait for it to finish or use another output folder (if no run is active, remove {lock.name})",
                ) from None
            lock.unlink(missing_ok=True)  # its process is gone
    else:
        raise FileProblem(out_dir, "its run lock cannot be taken", f"remove {lock.name} if no medseg run is active")
    try:
        os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> str | None:
    """Who holds ``lock`` ("process PID" or "process PID on HOST") when that process may still
    run, else None. A process on another machine (the output folder is shared storage) cannot
    be asked, so it is taken to run."""
    try:
        pid_text, _, host = lock.read_text().strip().partition(" ")
        pid = int(pid_text or 0)
    except (OSError, ValueError):
        return None
    if host and host != socket.gethostname():
        return f"process {pid} on {host}"
    return f"process {pid}" if pid > 0 and process_alive(pid) else None


def _plan_key(discovery: Discovery, options: BatchOptions, model_hash: str) -> str:
    """Identifies the whole run every shard belongs to (all scans, model, formats): shard
    parts are merged only when they share it, never with a part left by another run."""
    scans = "\n".join(f"{s.name}|{s.path}" for s in discovery.scans)
    text = f"{scans}|{model_hash}|{sorted(options.formats)}|{options.shard[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
