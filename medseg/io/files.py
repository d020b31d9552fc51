"""File helpers: atomic writes (temporary name, then rename), checksums and safe names.

A killed or failing run therefore never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

# ".{final name}.medseg-{pid}-{8 hex}.tmp{suffixes}": unmistakably medseg's, and owned by
# the process that writes it, so a clean-up can tell a dead run's leftover from a live one's.
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.medseg-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.[^/]*)?$")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same suffixes, so writers pick the format);
    on success rename it to ``final``, on error delete it."""
    final = Path(final)
    double = final.name.endswith((".nii.gz", ".seg.nrrd"))
    suffixes = "".join(final.suffixes[-2:]) if double else final.suffix
    tmp = final.with_name(f".{final.name}.medseg-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffixes}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def stale_temporary(path: Path) -> str | None:
    """The final name whose write left ``path``, when ``path`` is an atomic_path temporary
    of a process that no longer runs; None otherwise (a user's file, or a live write)."""
    match = _TEMPORARY.match(path.name)
    if match is None or not path.is_file():
        return None
    pid = int(match["pid"])
    return None if pid == os.getpid() or process_alive(pid) else match["final"]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of the file at ``path`` (read in 1 MiB blocks)."""
    import hashlib

    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sanitise(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]``: other runs become "_", no leading dots."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scan"
