"""Merge the report parts of a sharded run: the last shard to finish writes the whole."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medseg.batch.report import REPORT_JSON, RunReport, ScanRecord

logger = logging.getLogger(__name__)


def merge_shard_reports(out_dir: Path, count: int) -> bool:
    """Write ``medseg-run.json``/``.csv`` from all ``count`` parts once every part exists.

    Returns True when merged. Each shard calls this when done; the last one to finish finds
    all parts and merges (two finishing together write the same content, atomically).
    """
    parts = [out_dir / f"medseg-run.part{i}of{count}.json" for i in range(count)]
    if not all(p.is_file() for p in parts):
        return False
    datas = [json.loads(p.read_text()) for p in parts]
    if not all(d["settings"].get("complete") for d in datas):
        return False
    merged = RunReport()
    for data in datas:
        merged.records += [ScanRecord(**s) for s in data["scans"]]
        merged.skipped_files = data["non_scan_files"]
        merged.settings = {**data["settings"], "shard": f"merged from {count} parts"}
    merged.records.sort(key=lambda r: r.name)
    merged.write(out_dir, REPORT_JSON)
    logger.info("merged %d shard reports into %s", count, out_dir / REPORT_JSON)
    return True
