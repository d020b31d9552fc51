"""The run's quality-control index: ``index.html`` over every scan's montage (see
``medseg.io.montage``), status, time and problem."""

from __future__ import annotations

import html
from pathlib import Path

from medseg.batch.report import RunReport
from medseg.io.files import atomic_path


def write_index(report: RunReport, out_dir: Path) -> Path:
    """``index.html``: every scan with status, time, error and its montage."""
    rows = []
    for r in report.records:
        picture = r.outputs.get("qc")
        cell = f'<img src="{html.escape(Path(picture).name)}" height="160">' if picture else ""
        problem = html.escape(f"{r.stage}: {r.error} ({r.hint})") if r.status == "failed" else ""
        warn = "<br>".join(html.escape(w) for w in r.warnings)
        rows.append(
            f"<tr class='{r.status}'><td>{html.escape(r.name)}</td><td>{r.status}</td>"
            f"<td>{r.seconds:.1f} s</td><td>{problem}{warn}</td><td>{cell}</td></tr>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>medseg run</title>"
        "<style>body{font-family:sans-serif} td{padding:4px;vertical-align:top}"
        " tr.failed{background:#fdd} tr.ok{background:#efe}</style>"
        f"<h1>medseg run: {len(report.records)} scans, {len(report.failed)} failed</h1>"
        "<table><tr><th>scan</th><th>status</th><th>time</th><th>problem</th><th>QC</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    path = out_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
