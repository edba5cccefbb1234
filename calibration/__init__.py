"""Calibration: FP16/INT8 graphs, calibration data, fidelity reports (never on the device)."""
from .quantize import METHODS, QuantizeError, fidelity, quantize_bundle, quantize_graph

__all__ = ["METHODS", "QuantizeError", "fidelity", "quantize_bundle", "quantize_graph"]
