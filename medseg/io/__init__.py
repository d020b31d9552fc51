"""Reading scans (files and DICOM series, found by discovery) and writing label maps."""

from medseg.io.discover import read_scan

__all__ = ["read_scan"]
