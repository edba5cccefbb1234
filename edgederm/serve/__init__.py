"""Serving: ``edgederm serve`` (KServe v2 / Triton protocol on HTTP and gRPC) and ``export-triton``.

Device-side like the runtime: numpy, OpenCV, the runtime, and the ``serve`` extra
(starlette, uvicorn, grpcio, tritonclient's protocol definitions, prometheus_client);
never torch. Modules load lazily: ``from edgederm.serve.server import Server``.
"""
