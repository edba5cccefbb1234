"""On-device runtime: ``load(bundle).predict(...)``. numpy, OpenCV, ONNX Runtime; never torch."""
from .errors import (
    BundleError,
    BundleIntegrityError,
    EdgeDermError,
    ImageDecodeError,
    GraphLoadError,
    InputError,
    ManifestError,
    MemoryBudgetError,
    MissingDependencyError,
    RemoteBackendError,
)
from .model import DeployedModel, load
from .result import Result
from .store import load_active

__all__ = [
    "load", "load_active", "DeployedModel", "Result", "EdgeDermError", "InputError", "ImageDecodeError",
    "BundleError", "BundleIntegrityError", "ManifestError", "GraphLoadError", "MemoryBudgetError",
    "MissingDependencyError", "RemoteBackendError",
]
