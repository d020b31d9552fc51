"""What a run tells its caller as it goes: a callback object, silent by default."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.batch.report import ScanRecord


class RunProgress:
    """Override the methods you need; each is a no-op here.

    ``scan_done`` is called from the writer thread, one call at a time, as soon as a
    scan's outputs are renamed into place and its record is in the report (the file is
    rewritten then, unless that would take more than a tenth of the run's time, as in runs
    of thousands of scans: then with the next rewrite, and always at the end).
    """

    def run_started(self, scans: int) -> None:
        """``scans`` scans will be done or skipped by this run (this shard's share)."""

    def slices_done(self, done: int, total: int) -> None:
        """``done`` of the ``total`` slice predictions of the scan in flight are finished
        (an ensemble counts each member's slices; ``done == 0`` when a scan starts)."""

    def scan_done(self, record: ScanRecord) -> None:
        """One scan finished: ``record.status`` is "ok", "failed" or "skipped"."""
