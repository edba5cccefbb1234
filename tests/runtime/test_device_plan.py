"""The device memory plan (runtime/memory.py with a target, `edgederm plan`): its terms add up
to what the bundle and the target profile state, the batch is the largest that fits the
target's budget, and the CPU part (measured profile + computed buffers) predicts the
measured peak RSS of every zoo tiny model within 15 %. The GPU terms (CUDA context,
TensorRT workspace, activation width on the GPU) cannot be measured here: the plan says so."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from edgederm.cli import main
from edgederm.runtime.bundle import read_manifest
from edgederm.runtime.errors import BundleError, MemoryBudgetError
from edgederm.runtime.memory import ACTIVATION_SCALE, MARGIN_FRACTION, graph_bytes, plan
from edgederm.runtime.targets import load_target, target_names

NANO4 = "jetson-orin-nano-4gb-jp5"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_device_plan_terms_are_the_bundles_and_the_profiles(tiny_bundle, precision):
    manifest, target = read_manifest(tiny_bundle), load_target(NANO4)
    result = plan(manifest, None, 2048, 2048, target=target, precision=precision)
    parts = dict(result.fixed_parts)
    files = {stage.graphs[precision].file for stage in manifest.stages}
    assert parts["weights"] == graph_bytes(manifest, precision) == sum((tiny_bundle / f).stat().st_size for f in files)
    fp32_files = {stage.graphs["fp32"].file for stage in manifest.stages}
    assert parts["runtime"] == manifest.memory.fixed_bytes - sum((tiny_bundle / f).stat().st_size for f in fp32_files)
    assert parts["cuda_context"] == target.cuda_context_bytes and parts["tensorrt_workspace"] == target.tensorrt_workspace_bytes
    assert sum(parts.values()) == result.fixed_bytes
    assert result.per_tile_bytes == math.ceil(manifest.memory.per_tile_bytes * ACTIVATION_SCALE[precision])
    assert set(result.unmeasured) == {"cuda_context", "tensorrt_workspace", "os_reserved"}
    assert result.budget_bytes == target.memory_bytes - target.os_reserved_bytes
    assert result.predicted_peak_bytes + result.margin_bytes <= result.budget_bytes
    assert (result.target, result.precision) == (NANO4, precision)


def test_device_terms_are_what_the_budget_must_hold(tiny_bundle):
    """The smallest budget the error names plans one tile (image); two bytes less (the margin rounds down) is refused."""
    manifest, target = read_manifest(tiny_bundle), load_target(NANO4)
    free = plan(manifest, None, 2048, 2048, target=target, precision="int8")
    assert free.fixed_bytes > target.cuda_context_bytes + target.tensorrt_workspace_bytes
    with pytest.raises(MemoryBudgetError, match=r"at least") as info:
        plan(manifest, free.fixed_bytes, 2048, 2048, target=target, precision="int8")
    minimum = int(str(info.value).split("one tile needs ")[1].split("(")[1].split(" bytes")[0])
    need = free.fixed_bytes + free.per_tile_bytes + free.image_bytes + free.accumulator_bytes
    assert minimum == math.ceil(need / (1 - MARGIN_FRACTION))
    assert plan(manifest, minimum, 2048, 2048, target=target, precision="int8").batch_size == 1
    with pytest.raises(MemoryBudgetError):
        plan(manifest, minimum - 2, 2048, 2048, target=target, precision="int8")


def test_device_plan_refuses_budgets_it_cannot_honour(tiny_bundle):
    manifest, target = read_manifest(tiny_bundle), load_target(NANO4)
    usable = target.memory_bytes - target.os_reserved_bytes
    with pytest.raises(MemoryBudgetError, match=r"more than jetson-orin-nano-4gb-jp5 leaves to an app"):
        plan(manifest, usable + 1, 2048, 2048, target=target, precision="fp32")
    with pytest.raises(MemoryBudgetError, match=r"cannot be met for a 2048x2048 image on jetson-orin-nano-4gb-jp5 at "
                                                r"fp32: one tile needs"):
        plan(manifest, 512 * 2**20, 2048, 2048, target=target, precision="fp32")
    with pytest.raises(BundleError, match=r"stage 'classifier' has no bf16 graph"):
        plan(manifest, None, 2048, 2048, target=target, precision="bf16")


def test_x86_target_needs_a_budget_and_plans_every_target(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    for name in target_names():
        target = load_target(name)
        result = plan(manifest, 3 * 2**30, 1024, 1024, target=target, precision="fp32")
        assert result.budget_bytes == 3 * 2**30 and result.batch_size >= 1


def test_plan_command_prints_the_breakdown_and_says_what_is_unmeasured(tiny_bundle, capsys):
    assert main(["plan", str(tiny_bundle), "--target", NANO4, "--size", "2048", "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    for term in ("runtime", "weights", "cuda_context", "tensorrt_workspace", "activations x", "predicted peak", "budget"):
        assert term in out
    assert out.count("NOT MEASURED") >= 4 and "tile batch that fits:" in out
    assert main(["plan", str(tiny_bundle), "--target", NANO4, "--size", "2048x1536", "--precision", "int8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = plan(read_manifest(tiny_bundle), None, 2048, 1536, target=load_target(NANO4), precision="int8")
    assert data == json.loads(json.dumps(expected.to_dict()))


def test_plan_command_names_a_missing_precision(tiny_bundle, capsys):
    assert main(["plan", str(tiny_bundle), "--target", NANO4, "--precision", "fp16"]) == 2
    assert "has no fp16 graph" in capsys.readouterr().err


# --------------------------------------------------------------------------- the CPU part vs measured RSS

_PEAK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from edgederm.runtime import load
    from edgederm.runtime.memory import plan
    from edgederm.runtime.rss import peak_rss_bytes
    bundle, side = sys.argv[1], int(sys.argv[2])
    model = load(bundle, cache=False)
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    # A small clinical photo and empty metadata where the model takes them (missing fields are a category).
    extra = {"clinical": image[:256, :256].copy()} if "clinical" in model.modalities else {}
    model.predict(dermoscopy=image, metadata={} if "metadata" in model.modalities else None, **extra)
    print(json.dumps({"peak": peak_rss_bytes(), "predicted": plan(model.manifest, None, side, side).predicted_peak_bytes}))
""")


@pytest.mark.slow
def test_cpu_part_predicts_the_measured_peak_of_every_tiny_model(tmp_path_factory, record_property):
    """Fresh process per model: ONNX Runtime on the CPU at the bundle's default tile batch, 2048^2."""
    torch = pytest.importorskip("torch")
    from edgederm.export import export_bundle
    from edgederm.models import create_model, list_models

    for name in list_models(paper_size=False):
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp("plan") / name
        export_bundle(create_model(name), out, verify=False, progress=lambda m: None)
        proc = subprocess.run([sys.executable, "-c", _PEAK, str(out), "2048"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        error = (figures["predicted"] - figures["peak"]) / figures["peak"]
        record_property(f"figure:{name}_predicted_vs_peak_rss", f"{figures['predicted'] / 2**20:.0f} vs "
                        f"{figures['peak'] / 2**20:.0f} MiB ({error:+.1%})")
        assert abs(error) <= 0.15, (name, figures)


def test_load_plans_for_a_named_target_with_the_same_planner(tiny_bundle):
    from edgederm.runtime import load

    model = load(tiny_bundle, target=NANO4, precision="int8", cache=False)
    expected = plan(read_manifest(tiny_bundle), None, 2048, 2048, target=load_target(NANO4), precision="int8")
    assert model.target.name == NANO4 and model.memory_plan == expected
    assert model.plan_memory(1024, 768) == plan(model.manifest, None, 1024, 768, target=model.target, precision="int8")


def test_load_on_the_cpu_does_not_look_for_a_device(tiny_bundle, monkeypatch):
    import edgederm.runtime.model as model_module
    from edgederm.runtime import load

    def no_detection(*args, **kwargs):
        raise AssertionError("a CPU backend must keep the CPU plan")

    monkeypatch.setattr(model_module, "detect_target", no_detection)
    model = load(tiny_bundle, backend="onnxruntime-cpu", cache=False)
    assert model.target is None and model.plan_memory(512, 512) == plan(model.manifest, None, 512, 512)
