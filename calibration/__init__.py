"""Calibration: FP16/INT8 graphs, calibration data, fidelity reports (never on the device).

``edgederm.calibration.fidelity`` is the module of fidelity figures; the old
``fidelity(...)`` function lives on as ``edgederm.calibration.quantize.fidelity``.
"""
from .graphs import METHODS, QuantizeError, QuantSettings, quantize_dynamic_graph, quantize_graph
from .quantize import PRECISIONS, quantize_bundle

__all__ = ["METHODS", "PRECISIONS", "QuantSettings", "QuantizeError", "quantize_bundle", "quantize_dynamic_graph",
           "quantize_graph"]
