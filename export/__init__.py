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
    from .failures import DataDependentControlFlowError, UnsupportedOperatorError
    from .onnx import DEFAULT_OPSET, ExportError, ParityReport, check_parity, export_stage_onnx
    from .onnx_import import import_onnx
    from .preprocess_from import from_hf, from_timm, from_torchvision, preprocess_from
    from .wrap import wrap_module

_WHERE = {"export_bundle": ".bundle", "DEFAULT_OPSET": ".onnx", "ExportError": ".onnx", "ParityReport": ".onnx",
          "check_parity": ".onnx", "export_stage_onnx": ".onnx", "import_onnx": ".onnx_import",
          "wrap_module": ".wrap", "preprocess_from": ".preprocess_from", "from_timm": ".preprocess_from",
          "from_torchvision": ".preprocess_from", "from_hf": ".preprocess_from",
          "DataDependentControlFlowError": ".failures", "UnsupportedOperatorError": ".failures"}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
