"""One tester for every registered model (parametrised over list_models()).

A model registered in edgederm.models is covered the moment it exists: forward and
backward are finite, output shapes follow the task, every export stage goes to ONNX
and matches torch within 1e-4 relative at batch 1 and 5 (random and synthetic
images), and an INT8 QDQ graph of each stage executes in ONNX Runtime with its
decision agreement against fp32 reported.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgederm.data.synthetic import generate_case  # noqa: E402
from edgederm.export.onnx import check_parity, export_stage_onnx  # noqa: E402
from edgederm.models import create_model, list_models  # noqa: E402
from edgederm.runtime.preprocess import PreprocessConfig, preprocess  # noqa: E402

TINY = list_models("*_tiny")


@pytest.fixture(scope="module", params=TINY)
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


def synthetic_batch(size: tuple[int, int], n: int = 6) -> torch.Tensor:
    config = PreprocessConfig(input_size=size)
    return torch.from_numpy(np.stack([preprocess(generate_case(seed=i, size=max(size) * 2).image, config) for i in range(n)]))


def test_every_family_has_a_tiny_variant():
    families = {name.split("_")[0] for name in list_models()}
    assert families <= {name.split("_")[0] for name in TINY}


def test_tiny_is_small(model):
    params = sum(p.numel() for p in model.parameters())
    assert params < 5e6, f"{model.model_name}: {params / 1e6:.2f} M parameters"


def test_forward_backward_finite(model):
    model.train()
    inputs = model.example_inputs(batch=2)
    out = model(**inputs)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if model.task == "classify":
        assert logits.shape == (2, model.num_classes)
    else:
        assert logits.shape == (2, model.num_classes, *model.input_size)
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) > 0.9 * len(grads), "most parameters should receive gradients"
    model.eval()


@pytest.mark.slow
def test_export_parity_and_int8(model, tmp_path, record_property):
    from edgederm.calibration.graphs import quantize_dynamic_graph
    from edgederm.calibration.quantize import quantize_graph
    from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend

    for stage in model.export_stages(batch=2):
        path = export_stage_onnx(stage, tmp_path / f"{stage.name}.onnx")
        # random inputs at batch 1 and 5 (export used batch 2: no batch baked in)
        report = check_parity(stage, path, batch_sizes=(1, 5), rtol=1e-4)
        record_property(f"figure:{stage.name}.parity_rel", f"{report.max_rel_diff:.2e}")
        assert report.passed, f"{stage.name}: relative diff {report.max_rel_diff:.2e}"
        feed = dict(stage.inputs)
        for name in stage.image_inputs:
            shape = tuple(stage.inputs[name].shape[-2:])
            images = synthetic_batch(shape)
            feed = {k: (images if k == name else v[:1].expand(len(images), *v.shape[1:]).contiguous()) for k, v in feed.items()}
        if stage.image_inputs:
            synthetic = check_parity(stage, path, inputs=feed, rtol=1e-4)
            assert synthetic.passed, f"{stage.name} on synthetic images: {synthetic.max_rel_diff:.2e}"
        # INT8 QDQ executes; decision agreement with fp32 is measured and reported
        calib = [{k: v.numpy() for k, v in feed.items()}]
        int8_path = tmp_path / f"{stage.name}.int8.onnx"
        quantize_graph(path, int8_path, calib)
        fp32 = OnnxRuntimeBackend(path).run({k: v.numpy() for k, v in feed.items()})
        int8 = OnnxRuntimeBackend(int8_path).run({k: v.numpy() for k, v in feed.items()})
        for out_name in stage.outputs:
            a, b = fp32[out_name], int8[out_name]
            assert b.shape == a.shape and np.isfinite(b).all()
            if out_name in ("logits", "mask_logits"):  # decisions; embeddings get a correlation
                agreement = float((a.argmax(1) == b.argmax(1)).mean())
                record_property(f"figure:{stage.name}.{out_name}.int8_agreement", f"{agreement:.3f}")
            else:
                corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.size > 1 else 1.0
                record_property(f"figure:{stage.name}.{out_name}.int8_corr", f"{corr:.4f}")
        # int8_dynamic (every MatMul + fused GELU, the CPU form) executes and stays close
        dynamic_path = tmp_path / f"{stage.name}.int8_dynamic.onnx"
        info = quantize_dynamic_graph(path, dynamic_path)
        dynamic = OnnxRuntimeBackend(dynamic_path).run({k: v.numpy() for k, v in feed.items()})
        for out_name in stage.outputs:
            a, b = fp32[out_name], dynamic[out_name]
            assert b.shape == a.shape and np.isfinite(b).all()
            corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.size > 1 else 1.0
            record_property(f"figure:{stage.name}.{out_name}.int8_dynamic_corr", f"{corr:.4f} ({info['fused_gelu']} GELU fused)")
            assert corr > 0.95, f"{stage.name}.{out_name}: int8_dynamic correlation {corr:.4f}"
