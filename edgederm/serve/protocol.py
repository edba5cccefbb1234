"""The KServe v2 (Triton) inference protocol for an EdgeDerm model, independent of transport.

HTTP (``http_app``) and gRPC (``grpc_service``) both turn their wire format into a
list of :class:`Tensor` and call :func:`parse_request`; both turn a Result into
tensors with :func:`result_tensors`. The model's metadata and its Triton model
configuration are written once here and served by both (and by ``export-triton``).

Tensors a client sends (all optional in the protocol; the model says which it needs):

=================  ========  ============  ======================================
name               datatype  shape         what
=================  ========  ============  ======================================
``dermoscopy``     BYTES     [1]           the encoded image (JPEG, PNG, TIFF...)
``dermoscopy_rgb`` UINT8     [H, W, 3]     the decoded image, RGB order
``clinical``       BYTES     [1]           the clinical photo, encoded
``clinical_rgb``   UINT8     [H, W, 3]     the clinical photo, decoded
``metadata``       BYTES     [1]           JSON object, e.g. {"age": 54, "sex": "female"}
=================  ========  ============  ======================================

Decisions: every input name has one datatype, as Triton's model configuration
requires, so the encoded and the decoded image are two names rather than one name
with two datatypes; the same client then works against ``edgederm serve`` and
against the Python-backend model that ``export-triton`` writes. Probabilities are
FP64 so a client gets exactly the numbers ``predict`` returns. The mask comes as
``mask_png`` (BYTES, a PNG) by default and as ``mask`` (UINT8 [H, W]) when the
request names that output or sets the parameter ``mask_format`` to ``uint8``.
Image dimensions are read from the encoded header (or the tensor's shape) and
checked against the limits before anything is decoded.

Each stage graph of the bundle is also a model, ``<NAME>_<stage>``, whose tensors
are the graph's own (``stage_metadata``, ``stage_feed``): what a remote backend
sends when it tiles on the device and runs the graphs on a server.
"""
from __future__ import annotations

import json
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from edgederm.runtime.bundle import Stage, TensorSpec
from edgederm.runtime.errors import EdgeDermError, InputError, MemoryBudgetError
from edgederm.runtime.imageheader import read_header
from edgederm.runtime.imageio import SUPPORTED_FORMATS, decode_image

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "2"
MODEL_VERSION = "1"
IMAGE_INPUTS = ("dermoscopy", "clinical")
RGB_SUFFIX = "_rgb"
MASK_FORMATS = ("png", "uint8")

# KServe v2 datatype -> numpy dtype (BYTES is an object array of bytes).
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
# Triton model configuration's names for the same datatypes.
CONFIG_DTYPES = {"BYTES": "TYPE_STRING", **{k: f"TYPE_{k}" for k in DTYPES if k != "BYTES"}}


class ProtocolError(Exception):
    """A request the server answers with an error: HTTP status and gRPC code, one message."""

    def __init__(self, message: str, http_status: int = 400, grpc_code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.grpc_code = grpc_code


def not_found(message: str) -> ProtocolError:
    return ProtocolError(message, 404, "NOT_FOUND")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; everything is checked before decoding."""

    max_request_bytes: int = 64 * 2**20
    max_image_side: int = 16384
    max_image_pixels: int = 64_000_000
    timeout_s: float = 60.0
    queue_size: int = 8
    workers: int = 1


@dataclass
class Tensor:
    """One named tensor; BYTES data is a 1-D object array of ``bytes``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Request:
    """A validated request: images still encoded (decoding happens in the worker)."""

    images: dict[str, bytes | np.ndarray]
    metadata: dict[str, Any] | None
    outputs: list[str] | None
    mask_format: str
    max_pixels: int


# --------------------------------------------------------------------------- tensors


def element_count(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 1


def check_shape(name: str, shape: object) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise ProtocolError(f"input {name!r} has shape {shape!r}; expected a list of non-negative integers")
    return list(shape)


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Triton's binary BYTES layout: each element is a 4-byte little-endian length, then the bytes."""
    view = memoryview(buffer)
    out = np.empty(count, dtype=np.object_)
    pos = 0
    for index in range(count):
        if pos + 4 > len(view):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside element {index} of {count}")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > len(view):
            raise ProtocolError(f"input {name!r}: element {index} declares {length} bytes; "
                                f"only {len(view) - pos} follow")
        out[index] = bytes(view[pos:pos + length])
        pos += length
    if pos != len(view):
        raise ProtocolError(f"input {name!r}: {len(view) - pos} bytes left after {count} BYTES elements")
    return out


def serialize_bytes(elements: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in (bytes(x) for x in elements.reshape(-1)))


def tensor_from_buffer(name: str, datatype: str, shape: list[int], buffer: bytes | memoryview) -> np.ndarray:
    """A tensor's data from raw little-endian bytes (HTTP binary extension, gRPC raw contents)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buffer, count, name)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(buffer) != count * dtype.itemsize:
        raise ProtocolError(f"input {name!r} has {len(buffer)} bytes of data; shape {shape} of {datatype} "
                            f"needs {count * dtype.itemsize}")
    return np.frombuffer(buffer, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def tensor_from_list(name: str, datatype: str, shape: list[int], data: object) -> np.ndarray:
    """A tensor's data from the JSON form (a flat or nested list)."""
    count = element_count(shape)
    if datatype == "BYTES":
        flat = data if isinstance(data, list) else [data]
        flat = list(_flatten(flat))
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be strings; send images with the "
                                "binary data extension (binary_data=True in tritonclient)")
        out = np.empty(len(flat), dtype=np.object_)
        out[:] = [x.encode("utf-8") for x in flat if isinstance(x, str)]
    else:
        try:
            out = np.asarray(data, dtype=np.float64 if datatype.startswith("FP") else np.int64)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"input {name!r}: data is not a list of {datatype} numbers ({exc})") from None
        info = np.iinfo(DTYPES[datatype]) if not datatype.startswith("FP") and datatype != "BOOL" else None
        if info is not None and out.size and (out.min() < info.min or out.max() > info.max):
            raise ProtocolError(f"input {name!r}: values {out.min()}..{out.max()} do not fit {datatype}")
        out = out.astype(DTYPES[datatype]).reshape(-1)
    if out.size != count:
        raise ProtocolError(f"input {name!r} has {out.size} elements; shape {shape} needs {count}")
    return out.reshape(shape) if datatype != "BYTES" else out


def _flatten(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


# --------------------------------------------------------------------------- the model's interface


def input_specs(modalities: Sequence[str]) -> list[dict[str, Any]]:
    """The inputs a model takes, as KServe metadata: name, datatype, shape."""
    specs: list[dict[str, Any]] = []
    for image in IMAGE_INPUTS:
        if image in modalities:
            specs.append({"name": image, "datatype": "BYTES", "shape": [1]})
            specs.append({"name": image + RGB_SUFFIX, "datatype": "UINT8", "shape": [-1, -1, 3]})
    if "metadata" in modalities:
        specs.append({"name": "metadata", "datatype": "BYTES", "shape": [1]})
    return specs


def output_specs(task: str) -> list[dict[str, Any]]:
    specs = [
        {"name": "probabilities", "datatype": "FP64", "shape": [-1]},
        {"name": "probability_names", "datatype": "BYTES", "shape": [-1]},
        {"name": "needs_review", "datatype": "BOOL", "shape": [1]},
        {"name": "review_reasons", "datatype": "BYTES", "shape": [-1]},
        {"name": "timings", "datatype": "BYTES", "shape": [1]},
    ]
    if task == "segment":
        specs += [{"name": "mask_png", "datatype": "BYTES", "shape": [1]},
                  {"name": "mask", "datatype": "UINT8", "shape": [-1, -1]}]
    else:
        specs.insert(0, {"name": "label", "datatype": "BYTES", "shape": [1]})
    return specs


def model_metadata(name: str, task: str, modalities: Sequence[str], platform: str = "edgederm") -> dict[str, Any]:
    return {"name": name, "versions": [MODEL_VERSION], "platform": platform,
            "inputs": input_specs(modalities), "outputs": output_specs(task)}


def model_config(name: str, task: str, modalities: Sequence[str], class_names: Sequence[str], limits: Limits,
                 backend: str = "edgederm") -> dict[str, Any]:
    """The Triton model configuration (JSON form of model_config.proto) of the whole pipeline."""
    def config_tensor(spec: dict[str, Any], optional: bool) -> dict[str, Any]:
        out = {"name": spec["name"], "data_type": CONFIG_DTYPES[spec["datatype"]], "dims": spec["shape"]}
        if optional:
            out["optional"] = True
        return out

    return {
        "name": name,
        "backend": backend,
        "max_batch_size": 0,  # one image per request: the runtime batches tiles, not requests
        "input": [config_tensor(s, True) for s in input_specs(modalities)],
        "output": [config_tensor(s, False) for s in output_specs(task)],
        "parameters": {
            "task": {"string_value": task},
            "class_names": {"string_value": json.dumps(list(class_names))},
            "modalities": {"string_value": json.dumps(list(modalities))},
            "max_image_side": {"string_value": str(limits.max_image_side)},
            "max_image_pixels": {"string_value": str(limits.max_image_pixels)},
        },
    }


# --------------------------------------------------------------------------- stage models

# numpy dtype names of stage graph tensors -> KServe v2 datatypes.
NUMPY_DATATYPES = {np.dtype(v).name: k for k, v in DTYPES.items() if k != "BYTES"}


def _stage_datatype(stage: Stage, tensor: TensorSpec) -> str:
    datatype = NUMPY_DATATYPES.get(tensor.dtype)
    if datatype is None:
        raise EdgeDermError(f"stage {stage.name!r} tensor {tensor.name!r} has dtype {tensor.dtype!r}, "
                            "which the KServe v2 protocol cannot carry")
    return datatype


def _dims(shape: Sequence[Any]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def stage_metadata(name: str, stage: Stage) -> dict[str, Any]:
    """KServe metadata of one stage graph, served as model ``<NAME>_<stage>``."""
    def spec(tensor: TensorSpec) -> dict[str, Any]:
        return {"name": tensor.name, "datatype": _stage_datatype(stage, tensor), "shape": _dims(tensor.shape)}

    return {"name": name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
            "inputs": [spec(t) for t in stage.inputs], "outputs": [spec(t) for t in stage.outputs]}


def stage_config(name: str, stage: Stage, instances: int = 1, kind: str = "KIND_CPU",
                 platform: str = "onnxruntime", max_batch: int = 16) -> dict[str, Any]:
    """Triton model configuration of one stage graph; a dynamic first axis becomes dynamic batching."""
    tensors = stage.inputs + stage.outputs
    batched = all(isinstance(t.shape[0], str) for t in tensors)

    def entry(tensor: TensorSpec) -> dict[str, Any]:
        return {"name": tensor.name, "data_type": CONFIG_DTYPES[_stage_datatype(stage, tensor)],
                "dims": _dims(tensor.shape[1:] if batched else tensor.shape)}

    config: dict[str, Any] = {
        "name": name, "max_batch_size": max_batch if batched else 0,
        "input": [entry(t) for t in stage.inputs], "output": [entry(t) for t in stage.outputs],
        "instance_group": [{"count": instances, "kind": kind}],
    }
    config["platform" if platform == "tensorrt_plan" else "backend"] = platform
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": 500}
    return config


def stage_feed(stage: Stage, tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """A stage graph's feed from request tensors: names and datatypes checked here, shapes by the backend."""
    expected = {t.name: _stage_datatype(stage, t) for t in stage.inputs}
    feed: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name not in expected:
            raise ProtocolError(f"unexpected input {tensor.name!r}; stage {stage.name!r} takes {sorted(expected)}")
        if tensor.datatype != expected[tensor.name]:
            raise ProtocolError(f"input {tensor.name!r} has datatype {tensor.datatype}; expected "
                                f"{expected[tensor.name]}")
        feed[tensor.name] = tensor.data
    missing = sorted(set(expected) - set(feed))
    if missing:
        raise ProtocolError(f"missing input(s) {missing} of stage {stage.name!r}")
    return feed


def stage_tensors(stage: Stage, produced: Mapping[str, np.ndarray],
                  outputs: Sequence[str] | None) -> list[Tensor]:
    datatypes = {t.name: _stage_datatype(stage, t) for t in stage.outputs}
    for name in outputs or ():
        if name not in datatypes:
            raise ProtocolError(f"unknown output {name!r}; stage {stage.name!r} returns {sorted(datatypes)}")
    return [Tensor(n, datatypes[n], list(produced[n].shape), produced[n]) for n in (outputs or list(datatypes))]


# --------------------------------------------------------------------------- requests


def parse_request(tensors: Sequence[Tensor], parameters: Mapping[str, Any], outputs: Sequence[str] | None,
                  modalities: Sequence[str], task: str, limits: Limits) -> Request:
    """Check a request's tensors against the model's inputs and the limits; nothing is decoded."""
    specs = {s["name"]: s for s in input_specs(modalities)}
    images: dict[str, bytes | np.ndarray] = {}
    metadata: dict[str, Any] | None = None
    seen: set[str] = set()
    for tensor in tensors:
        spec = specs.get(tensor.name)
        if spec is None:
            raise ProtocolError(f"unexpected input {tensor.name!r}; this model takes {sorted(specs)}")
        if tensor.name in seen:
            raise ProtocolError(f"input {tensor.name!r} is given twice")
        seen.add(tensor.name)
        if tensor.datatype != spec["datatype"]:
            hint = ""
            if tensor.name in IMAGE_INPUTS:
                hint = f"; send decoded pixels as {tensor.name + RGB_SUFFIX!r} UINT8 [H, W, 3]"
            elif tensor.name.endswith(RGB_SUFFIX):
                hint = f"; send encoded files as {tensor.name[:-len(RGB_SUFFIX)]!r} BYTES [1]"
            raise ProtocolError(f"input {tensor.name!r} has datatype {tensor.datatype}; expected "
                                f"{spec['datatype']}{hint}")
        if tensor.name == "metadata":
            metadata = _metadata(tensor)
        elif tensor.name in IMAGE_INPUTS:
            images[tensor.name] = _encoded_image(tensor, limits)
        else:
            images[tensor.name[:-len(RGB_SUFFIX)]] = _rgb_image(tensor, limits)
    if not images and metadata is None:
        raise ProtocolError("missing input: send the image as 'dermoscopy' (BYTES [1], the encoded file) or "
                            f"'dermoscopy_rgb' (UINT8 [H, W, 3]); this model takes {sorted(specs)}")
    mask_format = str(parameters.get("mask_format", "png")).lower()
    if mask_format not in MASK_FORMATS:
        raise ProtocolError(f"parameter mask_format is {mask_format!r}; expected one of {', '.join(MASK_FORMATS)}")
    known = {s["name"] for s in output_specs(task)}
    for name in outputs or ():
        if name not in known:
            raise ProtocolError(f"unknown output {name!r}; this model returns {sorted(known)}")
    return Request(images=images, metadata=metadata, outputs=list(outputs) if outputs else None,
                   mask_format=mask_format, max_pixels=limits.max_image_pixels)


def _metadata(tensor: Tensor) -> dict[str, Any]:
    if tensor.data.size != 1:
        raise ProtocolError(f"input 'metadata' has {tensor.data.size} elements; expected one JSON object")
    raw = tensor.data.reshape(-1)[0]
    try:
        value = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"input 'metadata' is not valid JSON ({exc}); expected an object like "
                            '{"age": 54, "sex": "female", "site": "back"}') from None
    if not isinstance(value, dict):
        raise ProtocolError(f"input 'metadata' is JSON {type(value).__name__}; expected an object like "
                            '{"age": 54, "sex": "female", "site": "back"}')
    return value


def check_dimensions(name: str, width: int, height: int, limits: Limits) -> None:
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise ProtocolError(
            f"input {name!r} is a {width}x{height} image; this server takes at most {limits.max_image_side} px a "
            f"side and {limits.max_image_pixels} pixels. Fix: downscale or crop it before sending", 413)


def _encoded_image(tensor: Tensor, limits: Limits) -> bytes:
    if tensor.data.size != 1:
        raise ProtocolError(f"input {tensor.name!r} has {tensor.data.size} elements; expected one encoded image "
                            "(shape [1])")
    data = bytes(tensor.data.reshape(-1)[0])
    header = read_header(data)
    if header is None:  # what the server cannot size, it does not decode
        raise ProtocolError(f"input {tensor.name!r} ({len(data)} bytes) has no readable {SUPPORTED_FORMATS} header "
                            "(another format, or the file is cut short); send the image file's bytes as the camera "
                            "or the disk has them")
    check_dimensions(tensor.name, header.width, header.height, limits)
    return data


def _rgb_image(tensor: Tensor, limits: Limits) -> np.ndarray:
    shape = list(tensor.data.shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[2] != 3:
        raise ProtocolError(f"input {tensor.name!r} has shape {list(tensor.data.shape)}; expected [H, W, 3] "
                            "RGB (or [1, H, W, 3])")
    check_dimensions(tensor.name, shape[1], shape[0], limits)
    return np.ascontiguousarray(tensor.data.reshape(shape))


def check_request_dimensions(tensors: Sequence[tuple[str, str, list[int]]], limits: Limits) -> None:
    """Refuse a decoded image by its declared shape, before its data is even read."""
    for name, datatype, shape in tensors:
        if name.endswith(RGB_SUFFIX) and datatype == "UINT8" and len(shape) in (3, 4):
            height, width = shape[-3], shape[-2]
            check_dimensions(name, width, height, limits)


# --------------------------------------------------------------------------- results


def result_tensors(result: Any, task: str, outputs: Sequence[str] | None, mask_format: str) -> list[Tensor]:
    """A Result as the output tensors the request asked for (all of them by default)."""
    names = list(result.probabilities)
    produced: dict[str, tuple[str, np.ndarray]] = {
        "probabilities": ("FP64", np.array([result.probabilities[n] for n in names], dtype=np.float64)),
        "probability_names": ("BYTES", _bytes_array(names)),
        "needs_review": ("BOOL", np.array([bool(result.needs_review)])),
        "review_reasons": ("BYTES", _bytes_array(result.review_reasons)),
        "timings": ("BYTES", _bytes_array([json.dumps({k: round(v, 3) for k, v in result.timings.items()})])),
    }
    if task == "segment":
        wanted = list(outputs) if outputs else [s["name"] for s in output_specs(task)
                                                if s["name"] != ("mask" if mask_format == "png" else "mask_png")]
        if "mask_png" in wanted:
            ok, encoded = cv2.imencode(".png", result.mask)
            if not ok:
                raise EdgeDermError("could not encode the mask as PNG")
            produced["mask_png"] = ("BYTES", _bytes_array([encoded.tobytes()]))
        if "mask" in wanted:
            produced["mask"] = ("UINT8", np.ascontiguousarray(result.mask, dtype=np.uint8))
    else:
        produced["label"] = ("BYTES", _bytes_array([result.label or ""]))
        wanted = list(outputs) if outputs else [s["name"] for s in output_specs(task)]
    return [Tensor(n, produced[n][0], list(produced[n][1].shape), produced[n][1]) for n in wanted]


def _bytes_array(items: Sequence[str | bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = [i.encode("utf-8") if isinstance(i, str) else i for i in items]
    return out


def json_data(tensor: Tensor) -> list[Any]:
    """A tensor's data in the JSON form: a flat list (BYTES as UTF-8 strings)."""
    if tensor.datatype == "BYTES":
        try:
            return [bytes(x).decode("utf-8") for x in tensor.data.reshape(-1)]
        except UnicodeDecodeError:
            raise ProtocolError(f"output {tensor.name!r} holds binary data, which JSON cannot carry; request it "
                                "with binary_data=true (tritonclient: InferRequestedOutput(name, binary_data=True))"
                                ) from None
    return tensor.data.reshape(-1).tolist()


def raw_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")).tobytes()


# --------------------------------------------------------------------------- running


def predict_request(model: Any, request: Request) -> Any:
    """Decode a checked request's images and predict; ``timings`` gains the decode step."""
    started = time.perf_counter()
    images = {name: decode_image(value, name, max_pixels=request.max_pixels) if isinstance(value, bytes) else value
              for name, value in request.images.items()}
    decoded = time.perf_counter()
    result = model.predict(dermoscopy=images.get("dermoscopy"), clinical=images.get("clinical"),
                           metadata=request.metadata)
    result.timings = {"decode": (decoded - started) * 1000, **result.timings}
    return result


def as_protocol_error(exc: BaseException) -> ProtocolError:
    """Any exception a request raised, as the error the client receives (never a traceback)."""
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, MemoryBudgetError):
        return ProtocolError(str(exc), 413, "RESOURCE_EXHAUSTED")
    if isinstance(exc, InputError):  # ImageDecodeError included
        return ProtocolError(str(exc))
    if isinstance(exc, EdgeDermError):
        return ProtocolError(str(exc), 500, "INTERNAL")
    log.error("request failed", exc_info=exc)
    return ProtocolError(f"internal error ({type(exc).__name__}: {exc}); the server log has the details",
                         500, "INTERNAL")
