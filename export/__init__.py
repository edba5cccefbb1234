"""Export: torch models -> ONNX graphs in a verified bundle (uses torch; never on the device)."""
from .bundle import export_bundle
from .onnx import DEFAULT_OPSET, ExportError, ParityReport, check_parity, export_stage_onnx

__all__ = ["export_bundle", "DEFAULT_OPSET", "ExportError", "ParityReport", "check_parity", "export_stage_onnx"]
