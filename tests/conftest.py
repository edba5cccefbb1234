"""Shared fixtures; prints the measured figures (parity, INT8 agreement) at the end."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        for key, value in getattr(report, "user_properties", []):
            if key.startswith("figure:"):
                rows.append((report.nodeid.split("::")[-1], key[7:], value))
    if rows:
        terminalreporter.section("measured figures")
        for test, key, value in rows:
            terminalreporter.write_line(f"{test:<48} {key:<32} {value}")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Small labelled synthetic datasets (train/test) at 128 px."""
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root / "train", n_per_class=24, size=128, seed=0)
    generate_dataset(root / "test", n_per_class=10, size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, synthetic_data):
    """hifuse_tiny (random weights, seeded) exported and quantized: fp32 + int8 graphs."""
    torch = pytest.importorskip("torch")
    from edgederm.calibration import quantize_bundle
    from edgederm.export import export_bundle
    from edgederm.models import create_model

    torch.manual_seed(0)
    model = create_model("hifuse_tiny", class_names=["nevus", "melanoma", "vascular"])
    out = tmp_path_factory.mktemp("bundles") / "hifuse_tiny"
    export_bundle(model, out, clinical={"review_classes": ["vascular"]})
    quantize_bundle(out, synthetic_data / "train", eval_dir=synthetic_data / "test", max_images=32, say=lambda m: None)
    return out


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


@pytest.fixture()
def mini_bundle(tmp_path, write_mini_bundle):
    """A hand-made one-stage classifier bundle (Conv-ReLU-pool-Gemm, 32x32): builds in milliseconds."""
    return write_mini_bundle(tmp_path / "bundle")


@pytest.fixture(scope="session")
def write_mini_bundle():
    """``write(root) -> root``: the mini classifier bundle written to ``root`` (for fixtures of any scope)."""
    pytest.importorskip("onnx")
    return _write_mini_bundle


@pytest.fixture(scope="session")
def write_onnx_bundle():
    """``write(root, graphs, classes, size, clinical, task="classify", tiling=None) -> root``: a one-stage
    bundle from ONNX models (``{precision: onnx.ModelProto}``) taking ``dermoscopy`` [batch, 3, size, size]
    and giving ``logits`` ([batch, classes], or [batch, classes, size, size] for a segmenter)."""
    pytest.importorskip("onnx")
    return _write_onnx_bundle


def _write_onnx_bundle(root, graphs, classes, size, clinical, task="classify", tiling=None):
    import onnx

    from edgederm.runtime.bundle import FORMAT, FORMAT_VERSION, sha256_file, write_json_atomic

    root.mkdir(parents=True)
    files = {}
    for precision, model in graphs.items():
        onnx.save(model, str(root / f"classifier.{precision}.onnx"))
        files[f"classifier.{precision}.onnx"] = sha256_file(root / f"classifier.{precision}.onnx")
    write_json_atomic(root / "manifest.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sdk_version": "0.1.0",
        "model": {"name": "mini", "architecture": "Mini", "task": task, "modalities": ["dermoscopy"],
                  "class_names": list(classes), "input_size": [size, size], "metadata_schema": None},
        "preprocess": {"input_size": [size, size]},
        "stages": [{"name": "classifier",
                    "inputs": [{"name": "dermoscopy", "shape": ["batch", 3, size, size], "dtype": "float32", "source": "dermoscopy"}],
                    "outputs": [{"name": "logits", "dtype": "float32",
                                 "shape": ["batch", len(classes)] + ([size, size] if task == "segment" else [])}],
                    "graphs": {p: {"file": f"classifier.{p}.onnx", "sha256": files[f"classifier.{p}.onnx"]} for p in graphs}}],
        "tiling": tiling, "calibration": None,
        "clinical": clinical,
        "files": {name: {"sha256": digest, "bytes": (root / name).stat().st_size} for name, digest in files.items()},
    })
    return root


def _write_mini_bundle(root):
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    dense = rng.normal(size=(3, 4)).astype(np.float32)
    init = [helper.make_tensor("conv_w", TensorProto.FLOAT, conv.shape, conv.ravel()),
            helper.make_tensor("dense_w", TensorProto.FLOAT, dense.shape, dense.ravel()),
            helper.make_tensor("dense_b", TensorProto.FLOAT, [3], [0.1, -0.2, 0.05])]
    nodes = [helper.make_node("Conv", ["dermoscopy", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "dense_w", "dense_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "mini", [helper.make_tensor_value_info("dermoscopy", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _write_onnx_bundle(root, {"fp32": model}, ["nevus", "melanoma", "vascular"], 32,
                              {"temperature": 1.0, "review_threshold": 0.5, "review_classes": []})
