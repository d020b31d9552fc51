"""Output folders of exports and imports: refused when they would replace something by
mistake, written under a temporary name beside them and renamed when complete, so a failed
export or import leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import ModelError


def check_output_folder(output: Path, overwrite: bool, source: Path | None = None) -> None:
    """ModelError unless ``output`` can become a new folder: absent or empty, or any folder with
    ``overwrite``; never a file, nor the ``source`` folder, inside it or holding it (replacing
    the output would then delete the source)."""
    output = Path(output)
    if source is not None:
        out, src = output.resolve(), Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ModelError(output, f"is, holds or lies inside the source {source}", "write to a separate folder")
    if not (output.exists() or output.is_symlink()):
        return
    if not output.is_dir() or output.is_symlink():
        raise ModelError(output, "exists and is not a folder (or is a link)", "choose a new output folder")
    if not overwrite and any(output.iterdir()):
        raise ModelError(output, "already exists and is not empty", "choose a new output folder or pass --overwrite")


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``output``; when the block succeeds it replaces
    ``output`` (an earlier one is moved aside first, then deleted), otherwise it is deleted.
    Check ``output`` with ``check_output_folder`` before writing anything."""
    output = Path(output)
    tag = uuid.uuid4().hex[:8]
    tmp = output.with_name(f".{output.name}.{tag}.tmp")
    old = output.with_name(f".{output.name}.{tag}.old")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def copy_documents(source: Path, target: Path, skip_suffixes: tuple[str, ...]) -> None:
    """Copy the regular files of ``source`` but model.json (model card, validation figures...)
    into ``target``, except those ending in ``skip_suffixes`` (weights) and hidden files;
    sub-folders and links are left out."""
    for path in sorted(Path(source).iterdir()):
        if (
            path.name == "model.json"
            or path.suffix.lower() in skip_suffixes
            or path.name.startswith(".")
            or path.is_symlink()
            or not path.is_file()
        ):
            continue
        shutil.copy2(path, target / path.name)
