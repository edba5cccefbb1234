"""`edgederm export-triton`: config.pbtxt contents, and the repository on a real Triton server.

The real server is the ``tritonserver`` binary of the nvidia-pytriton wheel (CPU,
Python backend only: its onnxruntime and tensorrt_plan models can be checked here
for syntax, not run). The test builds the backend folder from the installed wheel
as Triton documents it and starts the binary on loopback with the exported
repository.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from edgederm.runtime import InputError, load  # noqa: E402
from edgederm.serve.triton_repo import export_triton  # noqa: E402


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _with_fake_engine(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` whose manifest lists a TensorRT engine (bytes that are not a plan)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    plan = b"not a real plan: only the repository layout is tested"
    (dest / "classifier.fp16.engine").write_bytes(plan)
    manifest["files"]["classifier.fp16.engine"] = {"sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)}
    manifest["engines"] = [{"stage": "classifier", "precision": "fp16", "file": "classifier.fp16.engine",
                            "profiles": {"dermoscopy": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32],
                                                        "max": [8, 3, 32, 32]}}}]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_repository_layout_and_configs(serve_bundles, tmp_path):
    bundle = _with_fake_engine(serve_bundles["classifier"], tmp_path / "bundle")
    rows = export_triton(bundle, tmp_path / "repo", name="lesions", instances=2)
    assert [(r["model"], r["platform"]) for r in rows] == [
        ("lesions_classifier", "onnxruntime"), ("lesions_classifier_tensorrt_fp16", "tensorrt_plan"),
        ("lesions", "python")]
    stage = read_config(tmp_path / "repo" / "lesions_classifier")
    assert stage.backend == "onnxruntime" and stage.max_batch_size == 16
    assert [(i.name, list(i.dims), model_config_pb2.DataType.Name(i.data_type)) for i in stage.input] == [
        ("dermoscopy", [3, 32, 32], "TYPE_FP32")]
    assert [(o.name, list(o.dims)) for o in stage.output] == [("logits", [3])]
    assert stage.HasField("dynamic_batching")
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in stage.instance_group] == [
        (2, "KIND_CPU")]
    assert (tmp_path / "repo" / "lesions_classifier" / "1" / "model.onnx").read_bytes() == \
        (bundle / "classifier.fp32.onnx").read_bytes()
    engine = read_config(tmp_path / "repo" / "lesions_classifier_tensorrt_fp16")
    assert engine.platform == "tensorrt_plan" and engine.max_batch_size == 8
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(engine.instance_group[0].kind) == "KIND_GPU"
    pipeline = read_config(tmp_path / "repo" / "lesions")
    assert pipeline.backend == "python" and pipeline.max_batch_size == 0
    assert [(i.name, i.optional) for i in pipeline.input] == [("dermoscopy", True), ("dermoscopy_rgb", True)]
    assert {o.name for o in pipeline.output} == {"label", "probabilities", "probability_names", "needs_review",
                                                 "review_reasons", "timings"}
    # the copied bundle loads and verifies on its own
    copied = load(tmp_path / "repo" / "lesions" / "1" / "bundle", backend="onnxruntime-cpu")
    assert copied.class_names == ["nevus", "melanoma", "vascular"]
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        export_triton(bundle, tmp_path / "repo", name="lesions")
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")]  # no staging left


def test_segmenter_pipeline_declares_both_mask_forms(serve_bundles, tmp_path):
    export_triton(serve_bundles["segmenter"], tmp_path / "repo")
    pipeline = read_config(tmp_path / "repo" / "SmallSegmenter")
    outputs = {o.name: (model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in pipeline.output}
    assert outputs["mask_png"] == ("TYPE_STRING", [1]) and outputs["mask"] == ("TYPE_UINT8", [-1, -1])
    assert "label" not in outputs


# --------------------------------------------------------------------------- real Triton server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _triton_environment(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """tritonserver binary, backend folder and environment from the installed nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # located, not imported: only its binary is used
    if spec is None or spec.origin is None:
        pytest.skip("nvidia-pytriton is not installed (pip install 'edgederm[dev]')")
    package = Path(spec.origin).parent
    root = package / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = package.parent / "nvidia_pytriton.libs"
    if not binary.exists() or not stub.exists():
        pytest.skip(f"the nvidia-pytriton wheel has no tritonserver binary or no Python {version} stub ({root})")
    environment = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
    for program in (binary, stub):
        linked = subprocess.run(["ldd", str(program)], capture_output=True, text=True, env=environment)
        missing = [line.split()[0] for line in linked.stdout.splitlines() if "not found" in line]
        if linked.returncode != 0 or missing:
            pytest.skip(f"{program.name} cannot run here: missing shared libraries {missing or linked.stderr.strip()}")
    backends = tmp_path / "backends"
    shutil.copytree(root / "backends" / "python", backends / "python")
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    # The stub of nvidia-pytriton 0.7 reads tensors with numpy 1.x's C layout; with numpy 2
    # it sees empty arrays. Its environment gets numpy 1.x first on the path.
    numpy1 = tmp_path / "numpy1"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(numpy1),
                          "numpy>=1.26,<2"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"could not install numpy 1.x for the Python-backend stub: {pip.stderr.strip()[-300:]}")
    repo_root = Path(__file__).resolve().parents[2]  # this tree's edgederm, not another install's
    # The stub's interpreter finds its standard library from the first `python` on PATH;
    # a virtual environment's python there would point it at another build's stdlib.
    environment["PATH"] = "/usr/bin:/bin"
    environment["PYTHONPATH"] = os.pathsep.join([str(numpy1), str(repo_root), sysconfig.get_paths()["purelib"]])
    return binary, backends, environment


@pytest.mark.slow
def test_exported_repository_answers_like_predict_on_a_real_triton_server(serve_bundles, lesion_images, tmp_path,
                                                                          record_property):
    import tritonclient.grpc as tritongrpc
    import tritonclient.http as tritonhttp

    binary, backends, environment = _triton_environment(tmp_path)
    repo = tmp_path / "repo"
    for bundle in serve_bundles.values():
        export_triton(bundle, repo)
    http_port, grpc_port = _free_port(), _free_port()
    # Only the Python-backend models: the wheel has no onnxruntime backend to load the stage models.
    command = [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
               "--model-control-mode", "explicit", "--load-model", "SmallClassifier", "--load-model",
               "SmallSegmenter", "--http-address", "127.0.0.1", "--http-port", str(http_port), "--grpc-address",
               "127.0.0.1", "--grpc-port", str(grpc_port), "--allow-metrics", "false", "--exit-timeout-secs", "10"]
    log = (tmp_path / "tritonserver.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        http = tritonhttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            try:
                if http.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()[-3000:]
            time.sleep(0.5)
        grpc = tritongrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        worst = 0.0
        for kind, model_name in [("classifier", "SmallClassifier"), ("segmenter", "SmallSegmenter")]:
            local = load(serve_bundles[kind], precision="fp32")
            for module, client in ((tritonhttp, http), (tritongrpc, grpc)):
                for image in ("lesion_jpg", "lesion_png"):
                    item = module.InferInput("dermoscopy", [1], "BYTES")
                    item.set_data_from_numpy(np.array([lesion_images[image].read_bytes()], dtype=object))
                    result = client.infer(model_name, [item])
                    expected = local.predict_file(lesion_images[image])
                    names = [n.decode() for n in result.as_numpy("probability_names")]
                    got = dict(zip(names, result.as_numpy("probabilities").tolist()))
                    assert got == pytest.approx(expected.probabilities, abs=1e-6)
                    worst = max(worst, max(abs(got[k] - v) for k, v in expected.probabilities.items()))
                    assert bool(result.as_numpy("needs_review")[0]) == expected.needs_review
                    if kind == "classifier":
                        assert result.as_numpy("label")[0].decode() == expected.label
                    else:
                        np.testing.assert_array_equal(result.as_numpy("mask"), expected.mask)
        record_property("figure:triton_vs_predict_max_abs", f"{worst:.1e}")
        # a hostile request is an error response; the model stays up
        item = tritonhttp.InferInput("dermoscopy", [1], "BYTES")
        item.set_data_from_numpy(np.array([b"\x89PNG\r\n\x1a\n" + bytes(4) + b"IHDR" + (60000).to_bytes(4, "big") * 2
                                           + bytes(16)], dtype=object))
        with pytest.raises(Exception, match="60000x60000 image"):
            http.infer("SmallClassifier", [item])
        assert http.is_model_ready("SmallClassifier")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
