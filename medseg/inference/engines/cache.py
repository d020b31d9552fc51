"""Converted networks kept on disk, so an engine converts a model once, not on every run.

An entry is a folder ``<cache>/engines/<key>/`` holding the converted files and
``entry.json`` (each file's sha256). The key hashes everything the conversion depends on: the
network's weights, its class and layout, the engine and its version, torch's version and this
module's format, so a changed model, engine or converter never reuses a stale entry.

The cache is a convenience, never a reason to fail: an entry is written under a temporary
folder name and renamed into place (concurrent medseg processes, e.g. torchrun shards, race
safely: the first rename wins and the others use their own copy); an unwritable cache folder
logs one warning and the conversion stays in memory; a damaged entry (a checksum that does not
match) logs a warning and is rebuilt. Entries hold only JSON, OpenVINO IR and ONNX files:
nothing in them is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medseg.io.files import file_digest

logger = logging.getLogger(__name__)

# Raise to invalidate every entry written by an older medseg (a converter change).
CACHE_FORMAT = 1
ENTRY_FILE = "entry.json"

# Cache folders an unwritable-folder warning was given for (one warning per folder and process).
_warned: set[Path] = set()


def cache_dir() -> Path:
    """Where converted networks are kept: ``$MEDSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/medseg``,
    else ``~/.cache/medseg`` (read when called, not at import)."""
    if os.environ.get("MEDSEG_CACHE_DIR"):
        return Path(os.environ["MEDSEG_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "medseg"
    return Path.home() / ".cache" / "medseg"


def weights_hash(network: nn.Module) -> str:
    """sha256 of ``network``'s tensors (names, dtypes, shapes and bytes), in state-dict order.

    Hashing what the network holds rather than the file it came from also covers models built
    or changed in memory. About 0.1 s per 100 MB of weights."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_key(**parts: object) -> str:
    """The key of an entry: a hash of ``parts`` (JSON-serialisable), the cache format and torch's version."""
    text = json.dumps({**parts, "cache_format": CACHE_FORMAT, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached(key: str, files: tuple[str, ...], write: Callable[[Path], None], what: str) -> Path | None:
    """The folder of entry ``key`` holding ``files``, written by ``write(folder)`` when it is
    missing or damaged. None when the cache folder cannot be written: the caller then converts
    in memory."""
    root = cache_dir() / "engines"
    folder = root / key
    if folder.is_dir():
        problem = _check(folder, files)
        if problem is None:
            logger.debug("%s: read from the cache %s", what, folder)
            return folder
        logger.warning("%s: the cached conversion in %s is damaged (%s); converting again", what, folder, problem)
    tmp = root / f".{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        sums = {name: file_digest(tmp / name) for name in files}
        (tmp / ENTRY_FILE).write_text(json.dumps({"what": what, "sha256": sums}, indent=1))
        _publish(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if root not in _warned:
            _warned.add(root)
            logger.warning(
                "cannot write converted networks to the cache folder %s (%s); converting in memory on "
                "every run (set MEDSEG_CACHE_DIR to a writable folder to keep them)",
                root,
                err.strerror or err,
            )
        return None
    logger.debug("%s: converted into the cache %s", what, folder)
    return folder


def _check(folder: Path, files: tuple[str, ...]) -> str | None:
    """What is wrong with the entry in ``folder``, or None when every file matches its checksum."""
    try:
        sums = json.loads((folder / ENTRY_FILE).read_text())["sha256"]
        for name in files:
            if file_digest(folder / name) != sums[name]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished entry ``tmp`` to ``folder``. A damaged entry there is moved aside
    first; one another process published meanwhile is kept (ours is deleted: same content)."""
    if folder.is_dir() and _check(folder, tuple(_names(tmp))) is not None:
        aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
        with contextlib.suppress(OSError):
            folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.is_dir():  # not a lost race: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _names(tmp: Path) -> list[str]:
    return [p.name for p in tmp.iterdir() if p.name != ENTRY_FILE]
