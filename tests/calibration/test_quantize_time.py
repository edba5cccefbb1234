"""What keeps ``quantize`` fast and small on paper-size bundles, checked on micro models.

- Calibration statistics are streamed (calibration/graphs.py ``calibration_ranges``):
  minmax ranges equal the ranges computed from every activation held at once, and
  the graph is the one ``quantize_static`` writes with its own in-memory collection;
  histogram methods (merged batch by batch) stay close to the in-memory histograms.
- Windows/tiles are sampled per image while the fp32 pass streams them (``RowSample``):
  seeded, deterministic, independent of how the pipeline batches them.
- The fp32 pass that makes the stage inputs also gives the reference decisions, and
  the fidelity/refit runs are not repeated.
- Progress lines carry k/N images and the time left; the report has a per-phase profile.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgederm.calibration import quantize_bundle  # noqa: E402
from edgederm.calibration.data import RowSample  # noqa: E402
from edgederm.calibration.graphs import QuantSettings, calibration_ranges, prepare_graph, quantize_graph  # noqa: E402
from edgederm.calibration.progress import Profile, format_seconds  # noqa: E402
from edgederm.runtime.errors import InputError  # noqa: E402

from .test_calibration import Block  # noqa: E402
from .test_quantize_models import MicroWindowed, _bundle  # noqa: E402


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    from edgederm.export.onnx import export_stage_onnx
    from edgederm.models.base import ExportStage

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("block_time")
    path = export_stage_onnx(ExportStage("block", Block().eval(), {"x": torch.randn(2, 3, 16, 16)}, ["y"],
                                         image_inputs=["x"]), folder / "block.onnx")
    prepared = prepare_graph(path, folder / "prepared.onnx")
    rng = np.random.default_rng(0)
    # Batches of different sizes (a shorter last one) and different scales, so that
    # per-batch extremes differ and their mean is not any single batch's.
    feeds = [{"x": (rng.standard_normal((n, 3, 16, 16)) * s).astype(np.float32)}
             for n, s in ((8, 1.0), (8, 2.0), (8, 0.5), (5, 1.5))]
    return prepared, feeds, folder


def _all_activations(prepared, names, feeds):
    """Every named tensor on every batch, all held at once (the in-memory reference)."""
    from onnx import helper

    from edgederm.runtime.backends.onnxruntime import cpu_session

    model = onnx.load(str(prepared))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = cpu_session(model)
    return [dict(zip(names, session.run(list(names), feed))) for feed in feeds]


def test_streamed_minmax_ranges_equal_the_in_memory_ones(block, tmp_path):
    prepared, feeds, _ = block
    ranges = calibration_ranges(prepared, iter(feeds), QuantSettings(method="minmax"), tmp_path)
    names = sorted(ranges.data)
    assert len(names) >= 10  # every Conv/MatMul/Gemm input and output of the block
    held = _all_activations(prepared, names, feeds)
    # One row per run (a 1-byte memory allowance): the combined extremes are the batches' own.
    one_row = calibration_ranges(prepared, iter(feeds), QuantSettings(method="minmax"), tmp_path, memory=1)
    for name in names:
        np.testing.assert_allclose(np.asarray(one_row.data[name].range_value, np.float64).ravel(),
                                   np.asarray(ranges.data[name].range_value, np.float64).ravel(), rtol=1e-5, atol=1e-6)
    for name in names:
        low, high = ranges.data[name].range_value
        # moving average (the SDK's minmax): mean over batches of each batch's extremes
        np.testing.assert_allclose(float(np.asarray(low).ravel()[0]), np.mean([b[name].min() for b in held]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(np.asarray(high).ravel()[0]), np.mean([b[name].max() for b in held]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def _scales(path):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if "scale" in i.name}


def _quantize_static_in_memory(prepared, out, feeds, method):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgederm.calibration.graphs import PERCENTILE, QUANTIZED_OPS, _reader

    extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibMovingAverage": method == "minmax"}
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
        feeds = feeds[:3]  # ORT's in-memory histogram collection stacks the batches: equal sizes only
    quantize_static(str(prepared), str(out), _reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options=extra,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method])


@pytest.mark.parametrize("method,rtol", [("minmax", 1e-5), ("percentile", 2e-2)])
def test_streamed_graph_matches_quantize_static_in_memory(block, tmp_path, method, rtol):
    prepared, feeds, _ = block
    used = feeds if method == "minmax" else feeds[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_graph(prepared, tmp_path / "streamed.onnx", used, settings=QuantSettings(method=method), prepared=True)
        _quantize_static_in_memory(prepared, tmp_path / "in_memory.onnx", used, method)
    streamed, in_memory = _scales(tmp_path / "streamed.onnx"), _scales(tmp_path / "in_memory.onnx")
    # (the SDK's graph drops the Q/DQ pairs of float consumers: a subset of the scales)
    assert set(streamed) <= set(in_memory) and len(streamed) >= 10
    for name, value in streamed.items():
        np.testing.assert_allclose(value, in_memory[name], rtol=rtol, atol=0, err_msg=name)


def _stream(rows, batch, sample):
    for start in range(0, len(rows), batch):
        sample.add({"x": rows[start:start + batch], "i": np.arange(start, min(start + batch, len(rows)))})
    return sample.rows()


def test_row_sample_is_seeded_uniform_and_batch_independent():
    rows = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    a = _stream(rows, 16, RowSample(8, np.random.default_rng([0, 1, 0])))
    b = _stream(rows, 3, RowSample(8, np.random.default_rng([0, 1, 0])))  # other batching, same draw
    c = _stream(rows, 16, RowSample(8, np.random.default_rng([1, 1, 0])))  # other seed
    np.testing.assert_array_equal(a["x"], b["x"])
    assert len(a["i"]) == 8 and len(set(a["i"].tolist())) == 8
    assert list(a["i"]) == sorted(a["i"])  # stream order kept
    np.testing.assert_array_equal(a["x"], rows[a["i"]])  # rows stay whole (every input of a row together)
    assert list(c["i"]) != list(a["i"])
    everything = _stream(rows, 5, RowSample(None, np.random.default_rng(0)))
    np.testing.assert_array_equal(everything["x"], rows)
    few = _stream(rows[:5], 2, RowSample(8, np.random.default_rng(0)))  # fewer rows than the sample: all
    np.testing.assert_array_equal(few["x"], rows[:5])
    # Reservoir sampling is uniform: over many seeds every row is kept ~8/64 of the time.
    counts = np.zeros(64)
    for seed in range(400):
        counts[_stream(rows, 16, RowSample(8, np.random.default_rng(seed)))["i"]] += 1
    assert counts.min() > 0.5 * 400 * 8 / 64 and counts.max() < 1.5 * 400 * 8 / 64
    with pytest.raises(InputError, match="rows per case"):
        RowSample(0, np.random.default_rng(0))


def test_profile_lines_and_time_left():
    now = [0.0]
    lines: list[str] = []
    profile = Profile(lines.append, clock=lambda: now[0], cpu_clock=lambda: now[0] / 2, min_interval=0.0)
    profile.plan("later", 10)
    with profile.phase("first", 4) as tick:
        for k in range(1, 5):
            now[0] += 3.0
            tick(k)
    assert lines[0] == "  [first] 4 image(s)"
    assert lines[2] == "  [first] 2/4 images, 3.0 s/image, ~6 s left in this phase, ~36 s overall"
    assert "4/4 images" in lines[-1] and "~30 s overall" in lines[-1]
    with profile.phase("later", 10) as tick:
        now[0] += 1.0
        tick(1)
    assert lines[-1] == "  [later] 1/10 images, 1.0 s/image, ~9 s left in this phase"
    report = profile.to_dict()
    assert [p["phase"] for p in report["phases"]] == ["first", "later"]
    assert report["phases"][0]["seconds"] == 12.0 and report["phases"][0]["cpu_seconds"] == 6.0
    assert report["seconds"] == 13.0 and report["peak_rss_mib"] > 0
    assert format_seconds(185) == "3 min 05 s" and format_seconds(7300) == "2 h 01 min"


def test_windowed_quantize_samples_windows_reuses_runs_and_reports_progress(tmp_path, synthetic_data, monkeypatch):
    from edgederm.calibration import quantize as q

    bundle = _bundle(MicroWindowed, tmp_path / "win")
    opened: list[bool] = []
    original = q._Evaluator._model
    monkeypatch.setattr(q._Evaluator, "_model",
                        lambda self, graphs, memo=None: opened.append(graphs is None) or original(self, graphs, memo))
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize_bundle(bundle, synthetic_data / "train", eval_dir=synthetic_data / "test", max_images=8,
                                 windows_per_image=2, say=lines.append)
    assert report["stages"]["window_encoder"]["calibration_inputs"] == 8 * 2  # 2 of the 4 windows per image
    assert report["stages"]["region_encoder"]["calibration_inputs"] == 8
    # fp32 graphs opened twice (fidelity, latency): the reference decisions came from the
    # stage-input pass and the refit reused the fidelity runs.
    assert opened.count(True) == 2, opened
    assert any("[fp32 pass (stage inputs)] 8/8 images" in line and "left in this phase" in line for line in lines)
    assert any("overall" in line for line in lines)
    phases = [p["phase"] for p in report["profile"]["phases"]]
    assert phases[0] == "fp32 pass (stage inputs)" and "fidelity: int8 pass" in phases and phases[-1] == "write bundle"
    assert "fp32 pass (agreement reference)" not in phases
    assert report["target"]["reached"] and report["fidelity"]["decision_agreement"] >= 0.9
    with pytest.raises(InputError, match="windows_per_image"):
        quantize_bundle(bundle, synthetic_data / "train", windows_per_image=0, say=lambda m: None)


@pytest.mark.slow
def test_sampled_windows_give_close_ranges_and_the_same_decisions(tmp_path, synthetic_data):
    """Half the windows per image: activation scales of the window encoder within 15% of
    all windows', the same decisions on the held-out images."""
    bundle = _bundle(MicroWindowed, tmp_path / "win")
    reports, scales = {}, {}
    for kept in (4, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports[kept] = quantize_bundle(bundle, synthetic_data / "train", eval_dir=synthetic_data / "test",
                                            max_images=24, windows_per_image=kept, target_agreement=None,
                                            say=lambda m: None)
        manifest = __import__("json").loads((bundle / "manifest.json").read_text())
        scales[kept] = _scales(bundle / manifest["stages"][0]["graphs"]["int8"]["file"])
    assert reports[4]["stages"]["window_encoder"]["calibration_inputs"] == 24 * 4
    assert reports[2]["stages"]["window_encoder"]["calibration_inputs"] == 24 * 2
    activations = [k for k, v in scales[4].items() if v.size == 1]  # per-tensor: activations (weights per channel)
    ratios = np.array([float(scales[2][k]) / float(scales[4][k]) for k in activations])
    assert len(ratios) >= 2 and np.all(np.abs(ratios - 1) < 0.15), ratios
    assert reports[2]["fidelity"]["decision_agreement"] == reports[4]["fidelity"]["decision_agreement"]


def test_stage_memo_answers_the_same_graph_and_inputs_only():
    from edgederm.calibration.quantize import _StageMemo

    calls: list[str] = []

    class Backend:
        name = "fake"

        def __init__(self, tag):
            self.tag = tag

        def run(self, feed):
            calls.append(self.tag)
            return {"y": feed["x"] * 2.0}

    memo = _StageMemo(max_bytes=1 << 20)
    a, a_again, b = memo.wrap(Backend("a"), "s.int8.onnx"), memo.wrap(Backend("a2"), "s.int8.onnx"), \
        memo.wrap(Backend("b"), "s.int8.float1.onnx")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(a.run({"x": x})["y"], x * 2)
    np.testing.assert_array_equal(a_again.run({"x": x.copy()})["y"], x * 2)  # same graph, same bytes: stored
    b.run({"x": x})  # other graph
    a.run({"x": x + 1})  # other inputs
    a.run({"x": x.reshape(3, 2)})  # same bytes, other shape
    assert calls == ["a", "b", "a", "a"] and memo.hits == 1 and a.name == "fake"
    small = _StageMemo(max_bytes=10)  # outputs over the allowance are not kept
    c = small.wrap(Backend("c"), "g")
    c.run({"x": x})
    c.run({"x": x})
    assert calls[-2:] == ["c", "c"] and small.bytes == 0


def test_peak_spans_nest():
    from edgederm.calibration.progress import peak_span

    with peak_span() as outer:
        with peak_span() as inner:  # opened at the same RSS: two spans all the same
            base = inner()
            block = np.ones(64 << 20, np.uint8)  # 64 MiB touched
            assert inner() - base >= 60 << 20
        del block
        with peak_span() as later:
            pass
        assert outer() >= inner() >= later()
