"""The run report of a batch: one record per scan, written after every scan.

``OUT_DIR/medseg-run.json`` (everything) and ``OUT_DIR/medseg-run.csv`` (one row per scan)
are rewritten atomically after each scan (paced in runs of thousands of scans, see
``medseg.batch.runner``), so a killed run leaves a report of what finished, which the next
run uses to resume; a scan whose outputs were written but not yet recorded is redone.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.io.files import atomic_path

logger = logging.getLogger(__name__)

REPORT_JSON = "medseg-run.json"
REPORT_CSV = "medseg-run.csv"
STAGES = ("discover", "read", "preprocess", "infer", "write")


@dataclass(frozen=True)
class ScanRecord:
    """What happened to one scan. ``status``: "ok", "failed" or "skipped" (done before);
    ``warnings`` why an "ok" result may still mislead (empty, outside the model's training
    data, NaNs replaced...); ``volumes_ml`` millilitres per foreground label; ``input_key``
    identifies the input files as they were read (see :func:`input_key`); ``fingerprint``
    that plus the model and output options (resume)."""

    name: str
    input: str
    kind: str
    status: str
    series_uid: str = ""
    description: str = ""
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    stage: str = ""
    error: str = ""
    hint: str = ""
    warnings: tuple[str, ...] = ()
    fingerprint: str = ""
    input_key: str = ""
    volumes_ml: dict[str, float] = field(default_factory=dict)


@dataclass
class RunReport:
    """All records of a run plus what it ran with; what ``medseg.segment`` returns.

    ``skipped_files`` are files found that are not scans (with the reason); ``notes`` are
    conditions of the whole run (said once, not per scan); ``path`` is the report file
    (for a shard, its part until the parts are merged into ``medseg-run.json``);
    ``seconds`` the run's wall-clock time.
    """

    records: list[ScanRecord] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    @property
    def failed(self) -> list[ScanRecord]:
        return [r for r in self.records if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        """Scans by status: ok, failed, skipped (done before)."""
        return {status: sum(r.status == status for r in self.records) for status in ("ok", "failed", "skipped")}

    def summary_line(self) -> str:
        """One line: how many scans ended how, and the time taken."""
        c = self.counts()
        doubted = sum(bool(r.warnings) for r in self.records if r.status != "failed")
        return (
            f"{len(self.records)} scan(s): {c['ok']} ok, {c['failed']} failed, "
            f"{c['skipped']} skipped (done before) in {self.seconds:.1f} s"
            + (f"; {doubted} with warnings (see the per-scan lines or the report)" if doubted else "")
        )

    def write(self, out_dir: Path, name: str = REPORT_JSON) -> None:
        """Write the JSON and CSV reports atomically (the same text as ``json.dumps(...,
        indent=1)`` of the whole report). Each record is encoded once and kept, so rewriting
        the report of a run of 10,000 scans costs a join, not 10,000 encodings."""
        out_dir.mkdir(parents=True, exist_ok=True)
        head = {
            "settings": self.settings,
            "summary": {
                "scans": len(self.records),
                "ok": sum(r.status == "ok" for r in self.records),
                "skipped_done_before": sum(r.status == "skipped" for r in self.records),
                "failed": len(self.failed),
                "non_scan_files": len(self.skipped_files),
                "seconds": self.seconds,
            },
            "notes": self.notes,
        }
        encoded = [self._encoded(r) for r in self.records]
        buffer = io.StringIO()
        csv.writer(buffer).writerow(_CSV_COLUMNS)
        text = buffer.getvalue() + "".join(row for _, row in encoded)
        with atomic_path(out_dir / Path(name).with_suffix(".csv").name) as tmp:
            tmp.write_text(text)
        scans = "[\n" + ",\n".join(js for js, _ in encoded) + "\n ]" if encoded else "[]"
        non_scan = _indented(json.dumps(self.skipped_files, indent=1))
        document = json.dumps(head, indent=1)[:-2] + f',\n "scans": {scans},\n "non_scan_files": {non_scan}\n}}'
        # The JSON last: it is what resume and evaluate read, so it never names a record
        # whose other report file could not be written.
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(document + "\n")

    def _encoded(self, record: ScanRecord) -> tuple[str, str]:
        """``record`` as JSON (indented as inside the report) and as a CSV row, made once."""
        cache = self.__dict__.setdefault("_encodings", {})
        hit = cache.get(id(record))
        if hit is not None and hit[0] is record:  # records are frozen: same object, same text
            return hit[1], hit[2]
        js = "  " + _indented(json.dumps(dataclasses.asdict(record), indent=1), "  ")
        row = dataclasses.asdict(record)
        row["outputs"] = ";".join(f"{k}={v}" for k, v in record.outputs.items())
        row["shape"] = "x".join(map(str, record.shape))
        row["spacing"] = "x".join(f"{s:.6g}" for s in record.spacing)
        row["warnings"] = " | ".join(record.warnings)
        row["timings"] = ";".join(f"{k}={v:.3f}" for k, v in record.timings.items())
        row["volumes_ml"] = ";".join(f"{k}={v:.3f}" for k, v in record.volumes_ml.items())
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS).writerow(row)
        cache[id(record)] = (record, js, buffer.getvalue())
        return js, buffer.getvalue()


_CSV_COLUMNS = [f.name for f in dataclasses.fields(ScanRecord)]


def _indented(text: str, prefix: str = " ") -> str:
    """``text`` (indented JSON) nested one level deeper: every line but the first shifted."""
    return text.replace("\n", "\n" + prefix)


def load_records(out_dir: Path, name: str = REPORT_JSON) -> dict[str, ScanRecord]:
    """Records of an earlier run in ``out_dir`` by scan name (empty if none or unreadable)."""
    path = out_dir / name
    if not path.is_file():
        return {}
    try:
        scans = json.loads(path.read_text())["scans"]
        known = {f.name for f in dataclasses.fields(ScanRecord)}
        records = [ScanRecord(**{k: v for k, v in s.items() if k in known}) for s in scans]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        logger.warning("%s: unreadable earlier report (%s); redoing every scan", path, err)
        return {}
    return {r.name: r for r in records}


def input_key(files: list[Path]) -> str:
    """Changes when any of ``files`` (the scan's input files) changes: path, size, time."""
    digest = hashlib.sha256()
    # Resolved, so the same file named relatively by segment and absolutely by evaluate
    # (or from another working directory) gives the same key.
    for path in sorted(p.resolve() for p in files):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_report(path: Path) -> RunReport:
    """The RunReport written at ``path`` (a merged shard report, say), for its counts."""
    data = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(ScanRecord)}
    records = [ScanRecord(**{k: v for k, v in s.items() if k in known}) for s in data["scans"]]
    return RunReport(
        records=records,
        skipped_files=data.get("non_scan_files", []),
        settings=data.get("settings", {}),
        notes=data.get("notes", []),
        path=path,
        seconds=float(data.get("summary", {}).get("seconds", 0.0)),
    )


def environment() -> dict[str, str]:
    """Versions and machine, for the report."""
    import monai
    import torch

    import medseg

    return {
        "medseg": medseg.__version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
