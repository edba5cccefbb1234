"""The KServe v2 HTTP/REST protocol as a Starlette (ASGI) app, served by uvicorn.

Supports Triton's binary tensor data extension (``Inference-Header-Content-Length``:
a JSON header, then each tensor's raw bytes), which is what tritonclient sends by
default and the only sane way to carry an encoded image. The body is read in
chunks and refused once it passes the size limit, whether or not the client sent
a Content-Length.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import protocol
from .metrics import log_access
from .protocol import ProtocolError, Tensor, as_protocol_error
from .service import InferenceService, timeout_error

HEADER_LENGTH = "Inference-Header-Content-Length"
Handler = Callable[[HttpRequest], Awaitable[Response]]


def create_app(service: InferenceService) -> Starlette:
    def endpoint(name: str, handler: Handler) -> Handler:
        """Auth, errors as KServe's {"error": ...}, metrics and the access log, for every route."""
        async def wrapped(request: HttpRequest) -> Response:
            start = time.perf_counter()
            try:
                service.authorize(request.headers.get("authorization"))
                response = await handler(request)
            except Exception as exc:  # every failure becomes a protocol error: the server stays up
                error = as_protocol_error(exc)
                response = JSONResponse({"error": error.message}, status_code=error.http_status)
            elapsed = time.perf_counter() - start
            service.metrics.requests.labels("http", name, str(response.status_code)).inc()
            if name == "infer":
                service.metrics.latency.labels("http").observe(elapsed)
            log_access(protocol="http", endpoint=name, method=request.method, path=request.url.path,
                       status=response.status_code, latency_ms=round(elapsed * 1000, 3),
                       request_bytes=int(request.headers.get("content-length") or 0),
                       peer=request.client.host if request.client else None)
            return response
        return wrapped

    def model_route(request: HttpRequest) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def live(request: HttpRequest) -> Response:
        return Response(status_code=200)

    async def ready(request: HttpRequest) -> Response:
        return Response(status_code=200 if service.ready else 503)

    async def server_metadata(request: HttpRequest) -> Response:
        return JSONResponse(service.server_metadata())

    async def model_metadata(request: HttpRequest) -> Response:
        return JSONResponse(service.model_metadata(*model_route(request)))

    async def model_ready(request: HttpRequest) -> Response:
        service.check_model(*model_route(request))
        return Response(status_code=200 if service.ready else 503)

    async def model_config(request: HttpRequest) -> Response:
        return JSONResponse(service.model_config(*model_route(request)))

    async def metrics(request: HttpRequest) -> Response:
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    async def infer(request: HttpRequest) -> Response:
        name, version = model_route(request)
        service.check_model(name, version)
        body = await _read_body(request, service.limits.max_request_bytes)
        header, tensors, parameters, requested = _parse_infer_body(request, body, service.limits)
        job = service.start(name, version, tensors, parameters, [o["name"] for o in requested] or None)
        try:
            outputs = await asyncio.wait_for(asyncio.wrap_future(job.future), service.limits.timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()
            raise timeout_error(service.limits.timeout_s) from None
        return _infer_response(header, job.model, outputs, parameters, requested)

    routes = [
        Route("/v2/health/live", endpoint("live", live)),
        Route("/v2/health/ready", endpoint("ready", ready)),
        Route("/v2", endpoint("server_metadata", server_metadata)),
        Route("/metrics", endpoint("metrics", metrics)),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(prefix, endpoint("model_metadata", model_metadata)),
            Route(prefix + "/ready", endpoint("model_ready", model_ready)),
            Route(prefix + "/config", endpoint("model_config", model_config)),
            Route(prefix + "/infer", endpoint("infer", infer), methods=["POST"]),
        ]
    return Starlette(routes=routes)


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send the request uncompressed "
                            "(images are compressed already)", 415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ProtocolError:
    return ProtocolError(f"the request has {size} bytes or more; this server takes at most {limit} bytes. "
                         "Fix: send a smaller image, or start the server with a larger --max-request-mb", 413)


def _parse_infer_body(request: HttpRequest, body: bytes, limits: protocol.Limits
                      ) -> tuple[dict[str, Any], list[Tensor], dict[str, Any], list[dict[str, Any]]]:
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {header_length!r}; expected the size of the JSON header, "
                                f"at most the body's {len(body)} bytes")
        json_part, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    else:
        json_part, binary = body, memoryview(b"")
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc}); expected a KServe v2 inference request "
                            '{"inputs": [{"name": ..., "datatype": ..., "shape": [...], "data": [...]}]}') from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError('the request has no "inputs" list; expected a KServe v2 inference request '
                            '{"inputs": [{"name": ..., "datatype": ..., "shape": [...], "data": [...]}]}')
    parameters = _object(header.get("parameters"), "parameters")
    requested = header.get("outputs") or []
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  for o in requested):
        raise ProtocolError('"outputs" must be a list of objects with a "name"')
    declared = []
    for item in header["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError('each input must be an object with "name", "datatype", "shape" and data')
        name, datatype = item["name"], item.get("datatype")
        if datatype not in protocol.DTYPES:
            raise ProtocolError(f"input {name!r} has datatype {datatype!r}; expected one of "
                                f"{', '.join(protocol.DTYPES)}")
        declared.append((name, datatype, protocol.check_shape(name, item.get("shape"))))
    protocol.check_request_dimensions(declared, limits)
    tensors = []
    offset = 0
    for item, (name, datatype, shape) in zip(header["inputs"], declared):
        item_parameters = _object(item.get("parameters"), f"input {name!r} parameters")
        size = item_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r} declares binary_data_size {size!r}; {len(binary) - offset} "
                                    "bytes of binary data are left")
            data = protocol.tensor_from_buffer(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            data = protocol.tensor_from_list(name, datatype, shape, item["data"])
        else:
            raise ProtocolError(f"input {name!r} has neither \"data\" nor parameters.binary_data_size")
        tensors.append(Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the inputs that declared theirs")
    return header, tensors, parameters, requested


def _object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object; got {type(value).__name__}")
    return value


def _infer_response(header: dict[str, Any], model: str, outputs: list[Tensor], parameters: dict[str, Any],
                    requested: list[dict[str, Any]]) -> Response:
    binary_default = bool(parameters.get("binary_data_output", False))
    asked = {o["name"]: _object(o.get("parameters"), f"output {o['name']!r} parameters") for o in requested}
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if asked.get(tensor.name, {}).get("binary_data", binary_default):
            blob = protocol.raw_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = protocol.json_data(tensor)
        described.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": protocol.MODEL_VERSION,
                            "outputs": described}
    if "id" in header:
        body["id"] = header["id"]
    encoded = json.dumps(body, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return Response(encoded, media_type="application/json")
    return Response(encoded + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(encoded))})
