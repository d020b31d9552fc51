"""Inference: slice-batch prediction and segmentation of whole scans on their original grid."""

from medseg._lazy import lazy_exports

_EXPORTS = {
    "EnsemblePredictor": "medseg.inference.predictor",
    "SlicePredictor": "medseg.inference.predictor",
    "make_predictor": "medseg.inference.predictor",
    "InferenceOptions": "medseg.inference.options",
    "PRECISIONS": "medseg.inference.options",
    "segment_volume": "medseg.inference.segment",
    "segment_volume_with_probabilities": "medseg.inference.segment",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
