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
)
from .model import DeployedModel, load
from .result import Result

__all__ = [
    "load", "DeployedModel", "Result", "EdgeDermError", "InputError", "ImageDecodeError",
    "BundleError", "BundleIntegrityError", "ManifestError", "GraphLoadError", "MemoryBudgetError", "MissingDependencyError",
]
