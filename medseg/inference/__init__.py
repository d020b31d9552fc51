"""Inference: slice-batch prediction and segmentation of whole scans on their original grid."""

from medseg.inference.predictor import InferenceOptions, SlicePredictor
from medseg.inference.segment import SegmentResult, segment_scan, segment_volume

__all__ = ["InferenceOptions", "SegmentResult", "SlicePredictor", "segment_scan", "segment_volume"]
