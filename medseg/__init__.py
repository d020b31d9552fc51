"""medseg: 2D U-Net segmentation of medical volumes, written back on each scan's original grid.

    import medseg
    report = medseg.segment("scans/", "out/")          # every scan in the tree, bundled model
    report = medseg.segment(["a.nii.gz", "dicom/s7"], "out/", "models/my-mr", formats="nifti")
    for record in report.records: print(record.name, record.status, record.outputs)

Lower level: ``medseg.read_scan`` (a path -> Volume), ``medseg.load_model`` and
``medseg.segment_volume`` (a Volume in memory -> label map on its grid).
"""

import logging

from medseg._lazy import lazy_exports

__version__ = "0.1.0"

# The library logs, never prints; applications decide where logs go.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Loaded on first use, so ``import medseg`` and ``medseg --help`` stay instant.
_EXPORTS = {
    "segment": "medseg.batch.run",
    "RunReport": "medseg.batch.report",
    "ScanRecord": "medseg.batch.report",
    "RunProgress": "medseg.batch.progress",
    "ScanInput": "medseg.io.discover",
    "read_scan": "medseg.io.discover",
    "load_model": "medseg.model",
    "make_predictor": "medseg.inference.predictor",
    "segment_volume": "medseg.inference.segment",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *sorted(_EXPORTS)]
