"""Export: torch models -> ONNX graphs in a verified bundle (uses torch; never on the device).

Names load lazily (PEP 562) so ``edgederm.export.tensorrt`` - which `edgederm build`
runs on the device, where torch may be absent - does not import torch through this
package.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bundle import export_bundle
    from .onnx import DEFAULT_OPSET, ExportError, ParityReport, check_parity, export_stage_onnx

_WHERE = {"export_bundle": ".bundle", "DEFAULT_OPSET": ".onnx", "ExportError": ".onnx", "ParityReport": ".onnx",
          "check_parity": ".onnx", "export_stage_onnx": ".onnx"}

__all__ = ["export_bundle", "DEFAULT_OPSET", "ExportError", "ParityReport", "check_parity", "export_stage_onnx"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
