"""One lazy-import helper for optional, heavy packages.

tensorrt, cuda-python, onnxruntime-gpu, torch_tensorrt and modelopt are optional:
the SDK must import and run the embedded default (ONNX Runtime on CPU) without
them. Modules call :func:`optional_import` at the point of use, so a missing
package fails with an install hint on first use instead of at ``import edgederm``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# What to tell the user for each optional package (import name -> install hint).
INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime  (Jetson: NVIDIA's onnxruntime-gpu build)",
    "tensorrt": "install TensorRT 8.5+ or 10.x (JetPack ships it; desktop: pip install 'edgederm[tensorrt]')",
    "cuda": "pip install cuda-python",
    "torch": "pip install 'edgederm[train]'",
    "onnx": "pip install 'edgederm[export]'",
    "safetensors": "pip install 'edgederm[train]'",
    "torch_tensorrt": "pip install torch-tensorrt (matching your torch build)",
    "modelopt": "pip install nvidia-modelopt",
    "matplotlib": "pip install matplotlib",
    "cryptography": "pip install 'edgederm[trust]'  (signature checks and encrypted graphs on the device)",
    "model_signing": "pip install 'edgederm[sign]'  (signing bundles in the release pipeline)",
    "ray": "pip install 'edgederm[ray]'  (evaluate --ray: evaluation on a Ray cluster)",
}


def optional_import(name: str, purpose: str = "") -> ModuleType:
    """Import ``name`` or raise :class:`MissingDependencyError` with an install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        root = name.split(".")[0]
        hint = INSTALL_HINTS.get(root, f"pip install {root}")
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"optional package {name!r} is not installed{why}: {exc}. Fix: {hint}"
        ) from exc


def is_available(name: str) -> bool:
    """True when ``name`` imports; never raises."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def import_tensorrt(purpose: str = "TensorRT engines") -> ModuleType:
    """The real ``tensorrt`` module, or :class:`MissingDependencyError` with the install hint."""
    trt = optional_import("tensorrt", purpose)
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        # Type stubs alone make ``import tensorrt`` succeed as an empty namespace package.
        raise MissingDependencyError(
            f"TensorRT is not installed (needed for {purpose}): 'tensorrt' imports from "
            f"{list(getattr(trt, '__path__', []))} but is not the TensorRT Python package (type stubs only?). "
            f"Fix: {INSTALL_HINTS['tensorrt']}"
        )
    return trt


def tensorrt_available() -> bool:
    """True when the real TensorRT Python package imports; never raises."""
    try:
        import_tensorrt()
    except Exception:
        return False
    return True


# -- the runner ---------------------------------------------------------------------------------------
