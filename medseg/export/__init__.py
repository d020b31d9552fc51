"""Model folders to other formats and back: MONAI bundles, TorchScript, ONNX, MONAI checkpoints."""

from medseg._lazy import lazy_exports

_EXPORTS = {
    "export_bundle": "medseg.export.bundle",
    "export_model": "medseg.export.networks",
    "import_checkpoint": "medseg.export.checkpoint",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
