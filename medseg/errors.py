"""Exception types. Every message names the file, says what is wrong and what to do."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of errors medseg reports to users (the CLI exits non-zero with the message)."""


class FileProblem(MedsegError):
    """A problem with one file or folder: ``path``, what is wrong, and what to do."""

    def __init__(self, path: str | Path, problem: str, hint: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        self.hint = hint
        text = f"{self.path}: {problem}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class ScanError(FileProblem):
    """A scan cannot be read or used: unreadable, wrong dimensionality, bad DICOM series..."""


class ModelError(FileProblem):
    """A model folder is missing, incomplete or does not match its specification."""


class ConfigError(MedsegError):
    """A configuration value or file is invalid."""
