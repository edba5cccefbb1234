"""`edgederm serve` against tritonclient (HTTP and gRPC), the protocol's reference client.

The server must give the same answers as ``predict_file`` on the same bundle, turn
every hostile request into a protocol error with a clear message while staying up,
refuse to start on a non-loopback address without a token, push back with 429 /
RESOURCE_EXHAUSTED when its queue is full, and finish in-flight requests on shutdown.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgederm.runtime import InputError, load  # noqa: E402
from edgederm.serve.protocol import Limits  # noqa: E402
from edgederm.serve.server import Server  # noqa: E402

TOKEN = "correct-horse-battery-staple-42"
PROTOCOLS = ("http", "grpc")


# --------------------------------------------------------------------------- clients and checks


def clients(server: Server, headers: dict[str, str] | None = None):
    return {"http": (tritonhttp, tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")),
            "grpc": (tritongrpc, tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}"))}


def infer(server: Server, protocol: str, tensors: dict[str, np.ndarray], outputs: list[str] | None = None,
          parameters: dict | None = None, headers: dict[str, str] | None = None, model: str | None = None):
    module, client = clients(server)[protocol]
    inputs = []
    for name, value in tensors.items():
        datatype = "BYTES" if value.dtype == object else {np.uint8: "UINT8", np.float32: "FP32"}[value.dtype.type]
        item = module.InferInput(name, list(value.shape), datatype)
        item.set_data_from_numpy(value)
        inputs.append(item)
    requested = [module.InferRequestedOutput(n) for n in outputs] if outputs else None
    if headers:  # gRPC metadata keys must be lower case; HTTP does not mind
        headers = {k.lower(): v for k, v in headers.items()}
    return client.infer(model or server.name, inputs, outputs=requested, parameters=parameters, headers=headers)


def encoded(path: Path) -> np.ndarray:
    return np.array([path.read_bytes()], dtype=object)


def probabilities(result) -> dict[str, float]:
    names = [n.decode() for n in result.as_numpy("probability_names")]
    return dict(zip(names, result.as_numpy("probabilities").tolist()))


def assert_same_answer(result, expected, task: str) -> None:
    """Everything the protocol returns equals the local Result (FP64 probabilities: exactly)."""
    assert probabilities(result) == pytest.approx(expected.probabilities, abs=1e-12)
    assert bool(result.as_numpy("needs_review")[0]) == expected.needs_review
    assert [r.decode() for r in result.as_numpy("review_reasons")] == expected.review_reasons
    timings = json.loads(result.as_numpy("timings")[0])
    assert {"queue", "decode", "total"} <= set(timings)
    if task == "segment":
        mask = cv2.imdecode(np.frombuffer(result.as_numpy("mask_png")[0], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, expected.mask)
    else:
        assert result.as_numpy("label")[0].decode() == expected.label


@pytest.fixture(scope="module")
def models(serve_bundles):
    return {name: load(path, precision="fp32") for name, path in serve_bundles.items()}


@pytest.fixture(scope="module")
def servers(models):
    started = {name: Server(model, http_port=0, grpc_port=0).start() for name, model in models.items()}
    yield started
    for server in started.values():
        assert server.stop(grace=10)


# --------------------------------------------------------------------------- same answers


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_encoded_images_get_the_same_answer_as_predict_file(servers, models, lesion_images, kind, protocol):
    server, model = servers[kind], models[kind]
    for image in ("lesion_jpg", "lesion_png"):
        result = infer(server, protocol, {"dermoscopy": encoded(lesion_images[image])})
        assert_same_answer(result, model.predict_file(lesion_images[image]), model.task)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_raw_pixels_and_the_uint8_mask(servers, models, lesion_images, protocol):
    from edgederm.runtime.imageio import read_image

    pixels = read_image(lesion_images["lesion_jpg"])
    expected = models["segmenter"].predict(dermoscopy=pixels)
    result = infer(servers["segmenter"], protocol, {"dermoscopy_rgb": pixels}, parameters={"mask_format": "uint8"})
    np.testing.assert_array_equal(result.as_numpy("mask"), expected.mask)
    assert result.as_numpy("mask_png") is None  # one form of the mask, the one asked for
    only = infer(servers["classifier"], protocol, {"dermoscopy_rgb": pixels[None]}, outputs=["probabilities"])
    assert only.as_numpy("label") is None
    assert only.as_numpy("probabilities").tolist() == pytest.approx(
        list(models["classifier"].predict(dermoscopy=pixels).probabilities.values()), abs=1e-12)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_metadata_and_config(servers, protocol):
    server = servers["segmenter"]
    _, client = clients(server)[protocol]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(server.name)
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_model_metadata(server.name)
    config = client.get_model_config(server.name)
    if protocol == "grpc":
        from google.protobuf import json_format

        metadata = json_format.MessageToDict(metadata, preserving_proto_field_name=True)
        config = json_format.MessageToDict(config, preserving_proto_field_name=True)["config"]
        metadata["inputs"][1]["shape"] = [int(d) for d in metadata["inputs"][1]["shape"]]  # int64 -> JSON string
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [("dermoscopy", "BYTES"),
                                                                        ("dermoscopy_rgb", "UINT8")]
    assert metadata["inputs"][1]["shape"] == [-1, -1, 3]
    assert {o["name"] for o in metadata["outputs"]} >= {"mask_png", "mask", "probabilities", "needs_review"}
    assert config["name"] == server.name and config["parameters"]["task"]["string_value"] == "segment"
    assert json.loads(config["parameters"]["class_names"]["string_value"]) == ["background", "lesion"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_remixformer_dermoscopy_clinical_and_metadata(remix_bundle, lesion_images, protocol):
    model = load(remix_bundle, precision="fp32")
    metadata = {"age": 54, "sex": "female", "site": "back"}
    with Server(model, http_port=0, grpc_port=0) as server:
        for request, kwargs in [
            ({"dermoscopy": encoded(lesion_images["lesion_jpg"])}, {}),
            ({"dermoscopy": encoded(lesion_images["lesion_jpg"]),
              "metadata": np.array([json.dumps(metadata).encode()], dtype=object),
              "clinical": encoded(lesion_images["clinical"])},
             {"metadata": metadata, "clinical": lesion_images["clinical"]}),
        ]:
            result = infer(server, protocol, request)
            assert_same_answer(result, model.predict_file(lesion_images["lesion_jpg"], **kwargs), "classify")


# --------------------------------------------------------------------------- hostile requests


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00" * 4 + b"\x00" * 64


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame segment claims another size."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def _hostile_cases(lesion_images):
    jpeg = lesion_images["lesion_jpg"].read_bytes()
    return {
        "wrong dtype": ({"dermoscopy": np.zeros(4, np.float32)}, None, 400, "INVALID_ARGUMENT",
                        "'dermoscopy' has datatype FP32; expected BYTES"),
        "60000x60000 PNG header": ({"dermoscopy": np.array([_png_header(60000, 60000)], dtype=object)}, None,
                                   413, "INVALID_ARGUMENT", "60000x60000 image; this server takes at most"),
        "60000x60000 JPEG header": ({"dermoscopy": np.array([_jpeg_with_size(jpeg, 60000, 60000)], dtype=object)},
                                    None, 413, "INVALID_ARGUMENT", "60000x60000 image"),
        "1x1 raw pixels": ({"dermoscopy_rgb": np.zeros((1, 1, 3), np.uint8)}, None, 400,
                                   "INVALID_ARGUMENT", "expected at least 8x8"),
        "truncated JPEG": ({"dermoscopy": np.array([jpeg[:len(jpeg) // 2]], dtype=object)}, None, 400,
                           "INVALID_ARGUMENT", "truncated JPEG"),
        "not an image": ({"dermoscopy": np.array([b"hello, this is text"], dtype=object)}, None, 400,
                         "INVALID_ARGUMENT", "has no readable JPEG .* header"),
        "unknown model": ({"dermoscopy": np.array([jpeg], dtype=object)}, "no_such_model", 404, "NOT_FOUND",
                          "unknown model 'no_such_model'"),
        "missing input": ({}, None, 400, "INVALID_ARGUMENT", "missing input"),
        "unexpected input": ({"metadata": np.array([b"{}"], dtype=object)}, None, 400, "INVALID_ARGUMENT",
                             "unexpected input 'metadata'"),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hostile_requests_get_clear_protocol_errors_and_the_server_stays_up(servers, models, lesion_images,
                                                                           protocol):
    server = servers["classifier"]
    for case, (tensors, model, status, code, match) in _hostile_cases(lesion_images).items():
        with pytest.raises(InferenceServerException, match=match) as info:
            infer(server, protocol, tensors, model=model)
        got = info.value.status()
        assert got == (str(status) if protocol == "http" else f"StatusCode.{code}"), case
    good = infer(server, protocol, {"dermoscopy": encoded(lesion_images["lesion_png"])})
    assert_same_answer(good, models["classifier"].predict_file(lesion_images["lesion_png"]), "classify")


def test_grpc_declared_shape_is_checked_before_the_data(servers):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    server = servers["classifier"]
    request = service_pb2.ModelInferRequest(model_name=server.name)
    request.inputs.add(name="dermoscopy_rgb", datatype="UINT8", shape=[60000, 60000, 3])
    request.raw_input_contents.append(b"\x00" * 12)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60000x60000 image" in info.value.details()


def _post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


_BINARY_HEADER = json.dumps({"inputs": [{"name": "dermoscopy", "datatype": "BYTES", "shape": [1],
                                          "parameters": {"binary_data_size": 100}}]}).encode()


@pytest.mark.parametrize("body, headers, match", [
    (b"{not json", {}, "not valid JSON"),
    (b'{"outputs": []}', {}, 'no "inputs" list'),
    (b'{"inputs": [{"name": "dermoscopy", "datatype": "BYTES", "shape": [1], "data": [1]}]}', {},
     "BYTES data in JSON must be strings"),
    (_BINARY_HEADER + b"\x00" * 8, {"Inference-Header-Content-Length": str(len(_BINARY_HEADER))},
     "binary_data_size 100"),
    (b'{"inputs": [{"name": "dermoscopy_rgb", "datatype": "UINT8", "shape": [60000, 60000, 3], "data": [0]}]}', {},
     "60000x60000 image"),
    (b'{"inputs": [{"name": "dermoscopy_rgb", "datatype": "UINT8", "shape": [8, 8, 3], "data": [300]}]}', {},
     "do not fit UINT8"),
    (b'{"inputs": []}', {"Content-Encoding": "gzip"}, "Content-Encoding 'gzip' is not supported"),
])
def test_malformed_http_bodies(servers, body, headers, match):
    server = servers["classifier"]
    status, answer = _post(server, f"/v2/models/{server.name}/infer", body, headers)
    assert status in (400, 413, 415) and answer["error"]
    assert match in answer["error"]


def test_request_size_limit_is_checked_before_the_body_is_read(models, lesion_images):
    limits = Limits(max_request_bytes=1024)
    with Server(models["classifier"], http_port=0, grpc_port=0, limits=limits) as server:
        status, answer = _post(server, f"/v2/models/{server.name}/infer", b"x" * 2048)
        assert status == 413 and "at most 1024 bytes" in answer["error"]
        with pytest.raises(InferenceServerException, match="larger than max|RESOURCE_EXHAUSTED") as info:
            infer(server, "grpc", {"dermoscopy": encoded(lesion_images["lesion_jpg"])})
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize("host, allow_remote, token, match", [
    ("0.0.0.0", False, None, "without --allow-remote and a token"),
    ("0.0.0.0", True, None, "without a token"),
    ("192.168.1.20", False, TOKEN, "without --allow-remote"),
    ("127.0.0.1", False, "short", "at least 16"),
])
def test_non_loopback_bind_without_flag_and_token_is_refused(models, host, allow_remote, token, match):
    with pytest.raises(InputError, match=match):
        Server(models["classifier"], host=host, allow_remote=allow_remote, token=token)


def test_unix_socket_is_owner_only_and_answers(models, tmp_path):
    import socket
    import stat

    path = tmp_path / "edgederm.sock"
    with Server(models["classifier"], http_port=None, grpc_port=None, uds=path) as server:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            sock.sendall(f"GET /v2/models/{server.name}/ready HTTP/1.1\r\nHost: localhost\r\n"
                         "Connection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
    assert not path.exists()  # removed on stop


def test_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from edgederm.serve.server import TOKEN_ENV, read_token

    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-1234")
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(tmp_path / "token") == TOKEN  # the file wins, trailing newline dropped
    assert read_token(None) == "from-the-environment-1234"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(InputError, match="cannot read the token file"):
        read_token(tmp_path / "absent")


def test_cli_refuses_a_public_bind_before_loading(tmp_path):
    process = subprocess.run([sys.executable, "-m", "edgederm.cli", "serve", str(tmp_path / "absent"), "--host",
                              "0.0.0.0"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "EDGEDERM_SERVE_TOKEN": ""})
    assert process.returncode == 2
    assert "refusing to serve on '0.0.0.0'" in process.stderr


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bearer_token_is_required_when_configured(models, lesion_images, protocol):
    with Server(models["classifier"], http_port=0, grpc_port=0, token=TOKEN) as server:
        request = {"dermoscopy": encoded(lesion_images["lesion_jpg"])}
        for headers in (None, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN}):
            with pytest.raises(InferenceServerException, match="bearer token") as info:
                infer(server, protocol, request, headers=headers)
            assert info.value.status() in ("401", "StatusCode.UNAUTHENTICATED")
        result = infer(server, protocol, request, headers={"Authorization": f"Bearer {TOKEN}"})
        assert result.as_numpy("label")[0].decode() in models["classifier"].class_names


# --------------------------------------------------------------------------- back-pressure and shutdown


def _background(fn, *args, **kwargs):
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except Exception as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_full_queue_answers_429_at_once(models, lesion_images, protocol, gated_model):
    gated = gated_model(models["classifier"])
    request = {"dermoscopy": encoded(lesion_images["lesion_jpg"])}
    with Server(gated, http_port=0, grpc_port=0, limits=Limits(workers=1, queue_size=1)) as server:
        running = _background(infer, server, protocol, request)
        assert gated.started.acquire(timeout=30)  # the worker holds request 1
        waiting = _background(infer, server, protocol, request)
        deadline = time.monotonic() + 30
        while server.service.queue.depth < 1:  # request 2 waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(InferenceServerException, match="busy") as info:
            infer(server, protocol, request)
        assert time.monotonic() - start < 5  # refused, not left to time out
        assert info.value.status() == ("429" if protocol == "http" else "StatusCode.RESOURCE_EXHAUSTED")
        gated.gate.set()
        for thread, box in (running, waiting):
            thread.join(30)
            assert "error" not in box and box["result"].as_numpy("label") is not None


def test_a_request_past_its_timeout_gets_504(models, lesion_images, gated_model):
    gated = gated_model(models["classifier"])
    with Server(gated, http_port=0, grpc_port=0, limits=Limits(timeout_s=0.5)) as server:
        with pytest.raises(InferenceServerException, match="did not finish within 0.5 s") as info:
            infer(server, "http", {"dermoscopy": encoded(lesion_images["lesion_jpg"])})
        assert info.value.status() == "504"
        gated.gate.set()


def test_stop_finishes_in_flight_requests_and_refuses_new_ones(models, lesion_images, gated_model):
    gated = gated_model(models["classifier"])
    request = {"dermoscopy": encoded(lesion_images["lesion_jpg"])}
    server = Server(gated, http_port=0, grpc_port=0, limits=Limits(workers=2)).start()
    in_flight = [_background(infer, server, p, request) for p in PROTOCOLS]
    for _ in PROTOCOLS:
        assert gated.started.acquire(timeout=30)
    stopping = _background(server.stop, 20)
    deadline = time.monotonic() + 10
    while server.service.accepting:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for protocol in PROTOCOLS:  # 503 / UNAVAILABLE, or the listener is already closed: either way not served
        with pytest.raises(Exception, match="shutting down|UNAVAILABLE|onnect"):
            infer(server, protocol, request)
    gated.gate.set()
    stopping[0].join(30)
    assert stopping[1].get("result") is True
    for thread, box in in_flight:
        thread.join(30)
        assert "error" not in box, box.get("error")
        assert box["result"].as_numpy("label")[0].decode() in gated.class_names


def test_sigterm_shuts_the_cli_server_down_gracefully(serve_bundles, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "edgederm.cli", "serve", str(serve_bundles["classifier"]),
                                "--http-port", "0", "--grpc-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        serving = json.loads(line)
        assert serving["event"] == "serving", line
        client = tritonhttp.InferenceServerClient(serving["http"].removeprefix("http://"))
        assert client.is_server_ready()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"event": "stopped", "finished_in_flight": True}
    access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {"protocol": "http", "endpoint": "ready", "status": 200}.items() <= access[0].items()


def test_serving_needs_no_torch_onnx_or_training_code(serve_bundles, lesion_images):
    """The server is device-side: it runs where torch, onnx and the training packages cannot load."""
    script = textwrap.dedent(f"""
        import builtins, json, sys
        blocked = ("torch", "onnx", "onnxscript", "edgederm.models", "edgederm.export", "edgederm.calibration",
                   "edgederm.data", "edgederm.train")
        real_import = builtins.__import__
        def guarded(name, *args, **kwargs):
            if any(name == b or name.startswith(b + ".") for b in blocked):
                raise ImportError(name + " is blocked in this test")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = guarded
        import numpy as np
        import tritonclient.http as tritonhttp
        from edgederm.runtime import load
        from edgederm.serve import grpc_service, http_app, loadtest, server, triton_repo
        with server.Server(load({str(serve_bundles["classifier"])!r}), http_port=0, grpc_port=0) as running:
            client = tritonhttp.InferenceServerClient(f"127.0.0.1:{{running.http_port}}")
            item = tritonhttp.InferInput("dermoscopy", [1], "BYTES")
            item.set_data_from_numpy(np.array([open({str(lesion_images["lesion_jpg"])!r}, "rb").read()], dtype=object))
            print(json.dumps(client.infer(running.name, [item]).as_numpy("label")[0].decode()))
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout.strip().splitlines()[-1]) in ("nevus", "melanoma", "vascular")


def test_cli_serves_a_store_and_audits_every_prediction(serve_bundles, lesion_images, tmp_path):
    """`edgederm serve --store DIR --audit-log LOG`: the store's active bundle, one audit record per request."""
    from edgederm.runtime.audit import verify_log
    from edgederm.runtime.store import BundleStore

    BundleStore(tmp_path / "store").install(serve_bundles["classifier"])
    log = tmp_path / "audit.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "edgederm.cli", "serve", "--store", str(tmp_path / "store"),
                                "--http-port", "0", "--grpc-port", "0", "--audit-log", str(log)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        serving = json.loads(process.stdout.readline())
        host = serving["http"].removeprefix("http://")
        for module, address in ((tritonhttp, host), (tritongrpc, serving["grpc"])):
            item = module.InferInput("dermoscopy", [1], "BYTES")
            item.set_data_from_numpy(encoded(lesion_images["lesion_jpg"]))
            result = module.InferenceServerClient(address).infer(serving["model"], [item])
            assert result.as_numpy("label")[0].decode() in ("nevus", "melanoma", "vascular")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    report = verify_log(log)
    assert report.ok and report.records == 2


# --------------------------------------------------------------------------- observability


def test_metrics_count_requests_reviews_and_latency(models, lesion_images):
    with Server(models["classifier"], http_port=0, grpc_port=0) as server:
        results = [infer(server, p, {"dermoscopy": encoded(lesion_images["lesion_jpg"])}) for p in PROTOCOLS]
        with pytest.raises(InferenceServerException):
            infer(server, "http", {})
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    reviews = sum(bool(r.as_numpy("needs_review")[0]) for r in results)
    assert 'edgederm_requests_total{endpoint="infer",protocol="http",status="200"} 1.0' in text
    assert 'edgederm_requests_total{endpoint="infer",protocol="grpc",status="OK"} 1.0' in text
    assert 'edgederm_requests_total{endpoint="infer",protocol="http",status="400"} 1.0' in text
    assert 'edgederm_infer_latency_seconds_count{protocol="http"} 2.0' in text
    assert f"edgederm_review_rate {reviews / 2}" in text
    assert "edgederm_predictions_total 2.0" in text
    assert "edgederm_queue_depth 0.0" in text
    peak = float(next(line.split()[1] for line in text.splitlines() if line.startswith("edgederm_memory_peak_bytes")))
    assert peak > 0
