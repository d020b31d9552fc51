"""Inference: slice-batch prediction and segmentation of whole scans on their original grid."""

from medseg.inference.predictor import EnsemblePredictor, InferenceOptions, SlicePredictor, make_predictor
from medseg.inference.segment import SegmentResult, segment_scan, segment_volume

__all__ = [
    "EnsemblePredictor",
    "InferenceOptions",
    "SegmentResult",
    "SlicePredictor",
    "make_predictor",
    "segment_scan",
    "segment_volume",
]
