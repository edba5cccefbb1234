"""EdgeDerm: put dermatology models on Jetson-class dermoscopes.

Importing this package is cheap (no torch); subpackages load what they need:
``edgederm.runtime`` (on-device: numpy, OpenCV, ONNX Runtime), ``edgederm.models``
and ``edgederm.data`` (PyTorch), ``edgederm.export`` and ``edgederm.calibration``.
"""
__version__ = "0.1.0"
