"""The KServe v2 gRPC protocol (Triton's ``inference.GRPCInferenceService``) on grpcio.

The message and service definitions are the protocol's published ones, as
generated modules shipped by ``tritonclient[grpc]`` (``service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``), so a client generated from the same
``.proto`` in any language talks to this server. RPCs this server does not offer
(streaming, repository control, shared memory, statistics) answer UNIMPLEMENTED
from the generated base class.
"""
from __future__ import annotations

import time
from concurrent import futures
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from . import protocol
from .metrics import log_access
from .protocol import ProtocolError, Tensor, as_protocol_error
from .service import InferenceService, timeout_error

# InferTensorContents field for each datatype sent without raw_input_contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _parameter(value: service_pb2.InferParameter) -> Any:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def _call(self, name: str, request: Any, context: grpc.ServicerContext, run: Callable[[], Any]) -> Any:
        """Auth, errors as gRPC status codes, metrics and the access log, for every RPC."""
        start = time.perf_counter()
        status = "OK"
        try:
            self.service.authorize(dict(context.invocation_metadata()).get("authorization"))
            return run()
        except Exception as exc:  # every failure becomes a status: the server stays up
            error = as_protocol_error(exc)
            status = error.grpc_code
            context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message)
        finally:
            elapsed = time.perf_counter() - start
            self.service.metrics.requests.labels("grpc", name, status).inc()
            if name == "infer":
                self.service.metrics.latency.labels("grpc").observe(elapsed)
            log_access(protocol="grpc", endpoint=name, status=status, latency_ms=round(elapsed * 1000, 3),
                       request_bytes=request.ByteSize(), peer=context.peer())

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("live", request, context, lambda: service_pb2.ServerLiveResponse(live=True))

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("ready", request, context,
                          lambda: service_pb2.ServerReadyResponse(ready=self.service.ready))

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("server_metadata", request, context,
                          lambda: service_pb2.ServerMetadataResponse(**self.service.server_metadata()))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            try:  # an unknown model is "not ready", as HTTP's 404 reads to a client
                self.service.check_model(request.name, request.version)
            except ProtocolError:
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=self.service.ready)
        return self._call("model_ready", request, context, run)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            return json_format.ParseDict(self.service.model_metadata(request.name, request.version),
                                         service_pb2.ModelMetadataResponse())
        return self._call("model_metadata", request, context, run)

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            config = json_format.ParseDict(self.service.model_config(request.name, request.version),
                                           model_config_pb2.ModelConfig())
            return service_pb2.ModelConfigResponse(config=config)
        return self._call("model_config", request, context, run)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("infer", request, context, lambda: self._infer(request, context))

    def _infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        service = self.service
        service.check_model(request.model_name, request.model_version)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise ProtocolError(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; send every "
                                "input's data in raw_input_contents, or none")
        declared = []
        for item in request.inputs:
            if item.datatype not in protocol.DTYPES:
                raise ProtocolError(f"input {item.name!r} has datatype {item.datatype!r}; expected one of "
                                    f"{', '.join(protocol.DTYPES)}")
            declared.append((item.name, item.datatype, protocol.check_shape(item.name, list(item.shape))))
        protocol.check_request_dimensions(declared, service.limits)
        tensors = []
        for index, (item, (name, datatype, shape)) in enumerate(zip(request.inputs, declared)):
            if raw:
                data = protocol.tensor_from_buffer(name, datatype, shape, raw[index])
            elif datatype == "BYTES":
                data = np.empty(len(item.contents.bytes_contents), dtype=np.object_)
                data[:] = list(item.contents.bytes_contents)
                if data.size != protocol.element_count(shape):
                    raise ProtocolError(f"input {name!r} has {data.size} elements; shape {shape} needs "
                                        f"{protocol.element_count(shape)}")
            else:
                values = list(getattr(item.contents, _CONTENTS_FIELD[datatype]))
                data = protocol.tensor_from_list(name, datatype, shape, values)
            tensors.append(Tensor(name, datatype, shape, data))
        parameters = {k: _parameter(v) for k, v in request.parameters.items()}
        job = service.start(request.model_name, request.model_version, tensors, parameters,
                            [o.name for o in request.outputs] or None)
        remaining = context.time_remaining()
        wait = service.limits.timeout_s if remaining is None else min(service.limits.timeout_s, remaining)
        try:
            outputs = job.future.result(timeout=wait)
        except futures.TimeoutError:
            job.future.cancel()
            raise timeout_error(wait) from None
        response = service_pb2.ModelInferResponse(model_name=job.model, model_version=protocol.MODEL_VERSION,
                                                  id=request.id)
        for tensor in outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(protocol.raw_bytes(tensor))
        return response


def create_server(service: InferenceService, address: str) -> tuple[grpc.Server, int]:
    """A started-later gRPC server bound to ``address``; returns it and the bound port."""
    limits = service.limits
    # Enough threads for every request the queue admits plus health checks; past that,
    # grpcio itself answers RESOURCE_EXHAUSTED instead of queueing without bound.
    threads = limits.workers + limits.queue_size + 4
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgederm-grpc"),
        maximum_concurrent_rpcs=threads,
        options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                 ("grpc.max_send_message_length", -1)],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"could not bind the gRPC server to {address}")
    return server, port
