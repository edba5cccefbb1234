"""Remote backend: a stage graph run by a KServe v2 server (``edgederm serve`` or Triton).

``load(bundle, backend="triton://HOST:PORT")``: tiling, preprocessing, calibration and
review stay on the device; each stage's tensors go to the server's model
``<NAME>_<stage>`` (``NAME`` the bundle's model name, as ``edgederm serve`` and
``edgederm export-triton`` publish it) over HTTP, PORT being the server's HTTP port.
A thin device with a clinic server.

Only the standard library and numpy: the request is the protocol's binary tensor
extension (a JSON header, then each tensor's little-endian bytes). A server that
cannot be reached, drops the connection, or answers 429/503 is retried
``retries`` times with exponential back-off, then :class:`RemoteBackendError` says
which server and stage failed; every attempt has a socket timeout, so a dead link
never hangs a prediction. A bearer token is read from ``$EDGEDERM_REMOTE_TOKEN``.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..bundle import Stage
from ..errors import InputError, RemoteBackendError
from .base import Backend, TensorInfo

SCHEME = "triton://"
TOKEN_ENV = "EDGEDERM_REMOTE_TOKEN"
HEADER_LENGTH = "Inference-Header-Content-Length"
# KServe v2 datatypes of the tensors stage graphs exchange.
_DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
              "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
_NUMPY = {v: k for k, v in _DATATYPES.items()}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_RETRY_STATUSES = (429, 502, 503, 504)


def safe_model_name(name: str) -> str:
    """A model name that is also a Triton repository folder and a URL path segment."""
    cleaned = _NAME_UNSAFE.sub("_", name).strip("._")
    return cleaned or "model"


def parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url.replace(SCHEME, "http://", 1)) if url.startswith(SCHEME) else None
    if parts is None or not parts.hostname or parts.port is None:
        raise InputError(f"backend {url!r} is not a remote server address; expected {SCHEME}HOST:PORT with the "
                         "server's HTTP port, e.g. triton://clinic-server:8000")
    return parts.hostname, parts.port


class RemoteBackend(Backend):
    name = "remote"

    def __init__(self, url: str, model: str, stage: Stage, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.2) -> None:
        self.url = url
        self.host, self.port = parse_url(url)
        self.model = model
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._inputs = [TensorInfo(i.name, i.shape, i.dtype) for i in stage.inputs]
        self._outputs = [TensorInfo(o.name, o.shape, o.dtype) for o in stage.outputs]
        token = os.environ.get(TOKEN_ENV)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._connection: http.client.HTTPConnection | None = None

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        header: dict[str, Any] = {
            "inputs": [{"name": i.name, "datatype": _DATATYPES[i.dtype], "shape": list(feed[i.name].shape),
                        "parameters": {"binary_data_size": feed[i.name].nbytes}} for i in self._inputs],
            "outputs": [{"name": o.name, "parameters": {"binary_data": True}} for o in self._outputs],
        }
        encoded = json.dumps(header).encode("utf-8")
        body = encoded + b"".join(np.ascontiguousarray(feed[i.name]).astype(
            np.dtype(i.dtype).newbyteorder("<"), copy=False).tobytes() for i in self._inputs)
        headers = {HEADER_LENGTH: str(len(encoded)), "Content-Type": "application/octet-stream", **self._headers}
        status, response_headers, data = self._post(f"/v2/models/{self.model}/infer", body, headers)
        return self._outputs_from(response_headers, data)

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                if self._connection is None:
                    self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._connection.request("POST", path, body=body, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out: reconnect
                problem = f"{type(exc).__name__}: {exc}"
                self._close()
                continue
            if response.status == 200:
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
            message = _error_message(data)
            if response.status in _RETRY_STATUSES:
                problem = f"HTTP {response.status}: {message}"
                continue
            raise RemoteBackendError(f"{self.url} refused stage model {self.model!r}: HTTP {response.status}: "
                                     f"{message}")
        raise RemoteBackendError(
            f"no answer from {self.url} for stage model {self.model!r} after {self.retries + 1} attempts "
            f"({problem}); check that the server runs and is reachable, or load the bundle with a local backend")

    def _outputs_from(self, headers: dict[str, str], data: bytes) -> dict[str, np.ndarray]:
        size = int(headers.get(HEADER_LENGTH.lower(), len(data)))
        answer = json.loads(data[:size])
        offset = size
        out: dict[str, np.ndarray] = {}
        for item in answer.get("outputs", []):
            dtype = np.dtype(_NUMPY[item["datatype"]]).newbyteorder("<")
            if "parameters" in item and "binary_data_size" in item["parameters"]:
                length = int(item["parameters"]["binary_data_size"])
                array = np.frombuffer(data, dtype=dtype, count=length // dtype.itemsize, offset=offset)
                offset += length
            else:
                array = np.asarray(item["data"], dtype=dtype)
            out[item["name"]] = array.astype(dtype.newbyteorder("="), copy=True).reshape(item["shape"])
        missing = {o.name for o in self._outputs} - set(out)
        if missing:
            raise RemoteBackendError(f"{self.url} answered stage model {self.model!r} without {sorted(missing)}")
        return out

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _error_message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", data[:200].decode("utf-8", "replace")))
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace")
