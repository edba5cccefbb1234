"""Backends that run one graph each: ONNX Runtime (CPU/CUDA/TensorRT EP), TensorRT engines."""
from .base import Backend, TensorInfo

__all__ = ["Backend", "TensorInfo"]
