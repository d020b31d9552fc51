"""Merge the report parts of a sharded run: the last shard to finish writes the whole.

Shards run as separate processes (``--shard I/N`` or torchrun ranks) with nothing shared
but the output folder, so the merge is arbitrated there: a shard merges only when every
part is complete and all come from the same run (same scans, model and formats); only one
shard holds the merge lock at a time; and a merge already written from the same parts is
not written (or announced) again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from medseg.batch.report import REPORT_JSON, RunReport, ScanRecord

logger = logging.getLogger(__name__)


def part_names(count: int) -> list[str]:
    return [f"medseg-run.part{i}of{count}.json" for i in range(count)]


def merge_shard_reports(out_dir: Path, count: int) -> Path | None:
    """Write ``medseg-run.json``/``.csv`` from all ``count`` parts once every part is complete.

    Returns the merged report's path when it exists for these parts (written now, or
    earlier by another shard), None while some shard is still running or another one is
    writing the merge at this moment.
    """
    parts = [out_dir / name for name in part_names(count)]
    if not all(p.is_file() for p in parts):
        return None
    texts = [p.read_text() for p in parts]
    datas = [json.loads(t) for t in texts]
    if not all(d["settings"].get("complete") for d in datas):
        return None
    plans = {d["settings"].get("plan") for d in datas}
    if len(plans) > 1:  # a part left by an earlier run over other scans: wait for its rerun
        logger.warning("shard reports in %s come from different runs; run every shard again to merge them", out_dir)
        return None
    key = hashlib.sha256("".join(texts).encode()).hexdigest()[:16]
    merged_path = out_dir / REPORT_JSON
    lock = out_dir / f".medseg-run.merge-{key}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None  # another shard is merging these very parts right now, and will say so
    try:
        if _merged_from(merged_path) == key:
            return merged_path
        merged = RunReport(path=merged_path)
        for data in datas:
            merged.records += [ScanRecord(**s) for s in data["scans"]]
            merged.skipped_files = data["non_scan_files"]
            merged.notes = list(dict.fromkeys([*merged.notes, *data.get("notes", [])]))
            merged.settings = {**data["settings"], "shard": f"merged from {count} parts", "merged_parts": key}
            merged.seconds = max(merged.seconds, float(data["summary"].get("seconds", 0.0)))
        merged.records.sort(key=lambda r: r.name)
        merged.write(out_dir, REPORT_JSON)
        logger.info("merged %d shard reports into %s", count, merged_path)
        return merged_path
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _merged_from(path: Path) -> str | None:
    """The parts' key of an existing merged report, if it is one."""
    try:
        return json.loads(path.read_text())["settings"].get("merged_parts")
    except (OSError, ValueError, KeyError, TypeError):
        return None
