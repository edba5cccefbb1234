"""Calibration pieces: data selection, tiles/windows, metrics, fp16 graphs, INT8 graph rules, sensitivity.

Graph-level tests use one small torch module with every op the rules are about
(Conv, BatchNorm, LayerNorm, MatMul attention with Softmax, GELU, output Sigmoid),
exported once per session with the SDK's exporter.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from edgederm.calibration import fidelity as fid  # noqa: E402
from edgederm.calibration.data import batch_feeds, select_calibration  # noqa: E402
from edgederm.calibration.graphs import (CONV_ACTIVATIONS, CONV_CHAIN_OPS, FLOAT_ONLY_OPS, QuantSettings,  # noqa: E402
                                         float_only_violations,
                                         quantize_dynamic_graph, quantize_graph)
from edgederm.runtime.backends.base import Backend, TensorInfo  # noqa: E402
from edgederm.runtime.errors import InputError  # noqa: E402
from edgederm.runtime.preprocess import PreprocessConfig  # noqa: E402


class Block(nn.Module):
    """Conv + BN stem, one attention block with LayerNorm/Softmax/GELU, sigmoid output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.BatchNorm2d(16), nn.ReLU())
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # N x 16 tokens x 16
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        t = t + self.proj(attn @ v)
        t = t + self.mlp(self.norm(t))
        return torch.sigmoid(self.head(t.mean(1)))


@pytest.fixture(scope="module")
def block_graph(tmp_path_factory):
    from edgederm.export.onnx import export_stage_onnx
    from edgederm.models.base import ExportStage

    torch.manual_seed(0)
    module = Block().eval()
    with torch.no_grad():  # non-trivial BN statistics
        module.stem[1].running_mean.uniform_(-0.5, 0.5)
        module.stem[1].running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("block")
    stage = ExportStage("block", module, {"x": torch.randn(2, 3, 16, 16)}, ["y"], image_inputs=["x"])
    path = export_stage_onnx(stage, folder / "block.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    return path, feeds, folder


def run(path, feed):
    from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path).run(feed)


# -- data ------------------------------------------------------------------------------
def test_selection_is_seeded_stratified_hashed_and_warns(synthetic_data):
    root = synthetic_data / "train"
    with pytest.warns(UserWarning, match="only 9 calibration images"):
        a = select_calibration(root, max_images=9, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = select_calibration(root, max_images=9, seed=3)
        c = select_calibration(root, max_images=9, seed=4)
    assert a.paths == b.paths and a.sha256 == b.sha256
    assert a.sha256 != c.sha256
    assert sorted(a.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 3 classes, round robin
    assert all(case.metadata and "age" in case.metadata for case in a.cases)
    assert all(case.mask is not None for case in a.cases)
    with pytest.raises(InputError, match="does not exist"):
        select_calibration(root / "nope")


def test_calibration_cases_are_the_dataset_readers_records(tmp_path):
    """A labels.csv folder means the same cases to calibration as to training."""
    import csv
    import shutil

    from edgederm.calibration.data import read_cases
    from edgederm.data import read_dataset
    from edgederm.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "d", n_per_class=2, size=32, seed=1)
    (root / "clinical").mkdir()
    shutil.copy(root / "images" / "syn_000001.jpg", root / "clinical" / "syn_000001.png")
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cases = read_cases(root)
    assert [c.image for c in cases] == [root / "images" / f"{r['id']}.jpg" for r in rows]
    assert [c.label for c in cases] == [int(r["label"]) for r in rows]
    assert [c.mask for c in cases] == [root / "masks" / f"{r['id']}.png" for r in rows]
    assert [c.clinical for c in cases] == [root / "clinical" / "syn_000001.png" if r["id"] == "syn_000001" else None
                                           for r in rows]
    assert [c.metadata for c in cases] == [{"age": int(r["age"]), "sex": r["sex"], "site": r["site"],
                                            "skin_tone": int(r["skin_tone"])} for r in rows]
    assert [c.metadata for c in cases] == [r.metadata for r in read_dataset(root)]
    (root / "images" / "syn_000002.jpg").unlink()  # a listed image that is gone is an error, not a skip
    with pytest.raises(InputError, match=r"lists 1 id\(s\) with no image .*syn_000002"):
        read_cases(root)


class _ZeroSegmenter(Backend):
    """A 2-class segmenter graph stand-in: logits 0 for every tile (the feeds are under test)."""

    name = "zeros"

    def __init__(self) -> None:
        self._inputs = [TensorInfo("image", ("batch", 3, 32, 32), "float32")]
        self._outputs = [TensorInfo("logits", ("batch", 2, 32, 32), "float32")]

    def _run(self, feed):
        return {"logits": np.zeros((len(feed["image"]), 2, 32, 32), np.float32)}


def _segmenter_manifest(root):
    from edgederm.runtime.bundle import parse_manifest

    spec = {"name": "image", "shape": ["batch", 3, 32, 32], "dtype": "float32", "source": "dermoscopy"}
    return parse_manifest({
        "format": "edgederm-bundle", "format_version": 1,
        "model": {"name": "seg", "task": "segment", "class_names": ["background", "lesion"]},
        "preprocess": {"input_size": [32, 32]}, "tiling": {"tile": 32, "overlap": 0.25, "batch_size": 3},
        "stages": [{"name": "seg", "inputs": [spec],
                    "outputs": [{"name": "logits", "shape": ["batch", 2, 32, 32], "dtype": "float32"}],
                    "graphs": {"fp32": {"file": "seg.onnx", "sha256": "0" * 64}}}],
        "files": {"seg.onnx": {"sha256": "0" * 64, "bytes": 1}},
    }, root)


def test_tiles_and_windows_are_the_runtime_ones(tmp_path):
    """Calibration records the feeds of the runtime's pipeline: the tiles are make_grid's."""
    from edgederm.runtime.memory import plan
    from edgederm.runtime.pipeline import Pipeline, Request, image_windows
    from edgederm.runtime.preprocess import preprocess
    from edgederm.runtime.tiling import make_grid

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 70, 3), dtype=np.uint8)
    config = PreprocessConfig(input_size=(32, 32))
    manifest = _segmenter_manifest(tmp_path)
    fed = []
    pipeline = Pipeline(manifest, {"seg": _ZeroSegmenter()}, lambda h, w: plan(manifest, None, h, w))
    run = pipeline.run(Request(image), record=lambda stage, feed: fed.append(feed["image"]))
    assert {len(f) for f in fed[:-1]} == {3} and run.info["batch_size"] == 3  # the bundle's tile batch
    tiles = np.concatenate(fed)
    grid = make_grid(100, 70, 32, 0.25)
    assert tiles.shape == (len(grid), 3, 32, 32)
    y, x = list(grid.tiles())[-1]  # last tile: flush with the bottom-right edge
    np.testing.assert_array_equal(tiles[-1], preprocess(image[y:y + 32, x:x + 32], config))
    windows = image_windows(image, config, window=16, rows=2, cols=3)
    assert windows.shape == (6, 3, 16, 16)
    resized = __import__("cv2").resize(image, (48, 32), interpolation=__import__("cv2").INTER_AREA)
    np.testing.assert_allclose(windows[4], preprocess(resized[16:32, 16:32], PreprocessConfig(input_size=(16, 16))))


def test_batch_feeds_keeps_every_case():
    per_case = [{"x": np.full((10, 2), i, np.float32)} for i in range(5)]
    batches = batch_feeds(per_case, batch_size=4, max_units=15, seed=0)
    rows = np.concatenate([b["x"] for b in batches])
    assert len(rows) == 15 and set(rows[:, 0].astype(int)) == set(range(5))


# -- metrics ---------------------------------------------------------------------------
def _brute_hd95(a, b):
    """Pooled 95th percentile of surface distances (MedPy), surfaces by 8-neighbour erosion."""
    def surface(m):
        p = np.pad(m, 1)
        inner = (p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
                 & p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:])
        return np.argwhere(m & ~inner)

    pa, pb = surface(a), surface(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.r_[d.min(1), d.min(0)], 95)


def test_dice_and_hd95_against_references():
    a = np.zeros((64, 64), bool)
    b = np.zeros((64, 64), bool)
    a[10:30, 10:30] = True
    b[15:40, 12:30] = True
    inter = 15 * 18
    assert fid.dice(a, b) == pytest.approx(2 * inter / (400 + 25 * 18))
    assert fid.hd95(a, b) == pytest.approx(_brute_hd95(a, b), abs=1e-3)
    c = np.zeros((64, 64), bool)
    c[5:50, 30:60] = True
    c[20:25, 40:45] = False  # a hole: an inner boundary
    assert fid.hd95(a, c) == pytest.approx(_brute_hd95(a, c), abs=1e-3)
    assert fid.hd95(a, a) == 0.0 and fid.dice(a, a) == 1.0
    empty = np.zeros_like(a)
    assert fid.hd95(empty, empty) == 0.0 and fid.hd95(a, empty) is None
    report = fid.segmentation_fidelity([a, a], [a, b], [a, None])
    assert report["dice_vs_fp32"] == pytest.approx((1 + fid.dice(a, b)) / 2)
    assert report["dice_change"] == 0.0 and report["hd95_change"] == 0.0  # only case 0 has a reference


def test_classification_fidelity_figures():
    p32 = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    pq = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 0])
    r = fid.classification_fidelity(p32, pq, labels, ["a", "b", "c"])
    assert r["decision_agreement"] == 0.75
    assert r["max_probability_diff"] == pytest.approx(0.1)
    assert r["mean_probability_diff"] == pytest.approx(np.abs(p32 - pq).mean())
    assert r["recall_change"] == {"a": 0.0, "b": -1.0, "c": 0.0}
    assert r["accuracy_fp32"] == 1.0 and r["accuracy_quantized"] == 0.75


# -- fp16 ------------------------------------------------------------------------------
def test_fp16_parity_io_float32_norms_in_fp32(block_graph, record_property):
    from edgederm.calibration.fp16 import convert_to_fp16

    path, feeds, folder = block_graph
    out = folder / "block.fp16.onnx"
    counts = convert_to_fp16(path, out)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [FLOAT]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax", "BatchNormalization")]
    assert kept and counts["fp32_nodes"] >= len(kept)
    for node in kept:  # normalisations compute in fp32
        assert types[node.input[0]] == FLOAT, node.name
        assert types[node.output[0]] == FLOAT, node.name
    matmul_weights = [types[i] for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                      for i in n.input[1:] if i in types and i in {x.name for x in model.graph.initializer}]
    assert matmul_weights and set(matmul_weights) == {HALF}
    worst = 0.0
    for feed in feeds:
        a, b = run(path, feed)["y"], run(out, feed)["y"]
        assert b.dtype == np.float32
        worst = max(worst, float(np.abs(a - b).max()))
    record_property("figure:fp16_max_abs_diff", f"{worst:.2e}")
    assert worst < 2e-3  # sigmoid outputs in [0, 1]: fp16 (11-bit mantissa) through 6 layers


# -- int8 ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_methods_run_and_stay_close(block_graph, tmp_path, method, record_property):
    path, feeds, _ = block_graph
    out = tmp_path / f"{method}.onnx"
    ragged = feeds + [{"x": feeds[0]["x"][:3]}]  # a shorter last batch (histogram calibrators stack batches)
    quantize_graph(path, out, ragged, method=method)
    worst = max(float(np.abs(run(path, f)["y"] - run(out, f)["y"]).max()) for f in feeds)
    record_property(f"figure:int8_{method}_max_abs_diff", f"{worst:.3f}")
    assert np.isfinite(worst) and worst < 0.1, worst


@pytest.mark.parametrize("fmt,act", [("qdq", "uint8"), ("qdq", "int8"), ("qoperator", "uint8")])
def test_int8_forms_keep_float_ops_out(block_graph, tmp_path, fmt, act):
    path, feeds, _ = block_graph
    out = tmp_path / "q.onnx"
    quantize_graph(path, out, feeds, settings=QuantSettings(format=fmt, activation_type=act))
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    if fmt == "qdq":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert float_only_violations(model) == []
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:  # Conv/MatMul/Gemm read INT8; others only a Conv's int8 output
            for name in node.input:
                src = producers.get(name)
                if src is not None and src.op_type == "DequantizeLinear" and node.op_type not in ("Conv", "MatMul", "Gemm"):
                    q = producers[src.input[0]]
                    float_tensor = producers.get(q.input[0])
                    if float_tensor is not None and float_tensor.op_type in CONV_ACTIVATIONS:
                        float_tensor = producers.get(float_tensor.input[0])
                    assert float_tensor is not None and float_tensor.op_type in ("Conv",) + CONV_CHAIN_OPS, node.op_type
                    assert node.op_type not in FLOAT_ONLY_OPS, node.op_type
        quantized = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                     and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]
        assert len(quantized) >= 6
        assert {"LayerNormalization", "Softmax", "Erf", "Sigmoid"} <= ops and set(FLOAT_ONLY_OPS) & ops
    else:
        assert ops & {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}
    worst = max(float(np.abs(run(path, f)["y"] - run(out, f)["y"]).max()) for f in feeds)
    assert worst < 0.1


def test_dynamic_int8_runs(block_graph, tmp_path):
    path, feeds, _ = block_graph
    out = tmp_path / "dyn.onnx"
    info = quantize_dynamic_graph(path, out)
    assert info["tensorrt_compatible"] is False
    assert info["fused_gelu"] == 1 and info["matmul_weights_only"] is False  # the MLP's nn.GELU
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert set(ops) & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    assert "Gelu" in ops and "Erf" not in ops
    # qkv, proj, 2 MLP, head, and q @ k^T and attn @ v (both inputs activations): 7 in all
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 7
    worst = max(float(np.abs(run(path, f)["y"] - run(out, f)["y"]).max()) for f in feeds)
    assert worst < 0.05


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="method 'kl'.*minmax, entropy, percentile"):
        QuantSettings(method="kl")
    with pytest.raises(InputError, match="modelopt.*activation_type='int8'"):
        QuantSettings(backend="modelopt")


def test_modelopt_qdq(block_graph, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization",
                        reason="nvidia-modelopt is not installed (pip install nvidia-modelopt; its ONNX path is optional)")
    path, feeds, _ = block_graph
    out = tmp_path / "modelopt.onnx"
    quantize_graph(path, out, feeds, settings=QuantSettings(backend="modelopt", activation_type="int8"))
    model = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert float_only_violations(model) == []
    worst = max(float(np.abs(run(path, f)["y"] - run(out, f)["y"]).max()) for f in feeds)
    assert worst < 0.1


# -- sensitivity -----------------------------------------------------------------------
def test_return_to_float_is_exact_and_ranks(block_graph, tmp_path):
    from edgederm.calibration.graphs import prepare_graph
    from edgederm.calibration.fidelity import relative_error
    from edgederm.calibration.sensitivity import node_sensitivity, only_quantized, quantized_nodes, return_to_float, run_graph

    path, feeds, _ = block_graph
    prepared = prepare_graph(path, tmp_path / "prepared.onnx")
    out = tmp_path / "q.onnx"
    quantize_graph(prepared, out, feeds, prepared=True)
    qdq, ref = onnx.load(str(out)), onnx.load(str(prepared))
    nodes = quantized_nodes(qdq)
    all_float = return_to_float(qdq, ref, nodes)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in all_float.graph.node)
    for a, b in zip(run_graph(all_float, feeds), run_graph(ref, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    scores = node_sensitivity(qdq, ref, feeds[:1], max_seconds=float("inf"))
    assert set(scores) == set(nodes)
    # each score is the output error with that node alone in INT8
    reference = run_graph(ref, feeds[:1])[0]
    for node in nodes:
        alone = run_graph(only_quantized(qdq, ref, node, nodes), feeds[:1])[0]
        assert scores[node] == pytest.approx(relative_error(reference.ravel(), alone.ravel()), rel=1e-6), node
    assert max(v for v in scores.values() if v is not None) > 0  # INT8 rounding moves the output
    # out of time before the first node: none measured, all ranked last (None)
    assert set(node_sensitivity(qdq, ref, feeds[:1], max_seconds=-1).values()) == {None}
