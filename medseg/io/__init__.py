"""Reading scans (files and DICOM series, found by discovery) and writing label maps."""

from medseg._lazy import lazy_exports

# Loaded on first use: importing one reader or writer (medseg.io.volume, medseg.io.formats)
# does not load discovery and every reader behind it.
_EXPORTS = {"read_scan": "medseg.io.discover"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
