"""Memory planning: sizes, the batch a budget buys, the error that names the minimum,
the measured peak at 2048^2 vs 8192^2 (fresh processes), and the optimised-graph cache."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgederm.runtime import MemoryBudgetError, load
from edgederm.runtime.errors import InputError
from edgederm.runtime.memory import MARGIN_FRACTION, MemoryProfile, parse_size, plan_batch, segment_buffers


@pytest.mark.parametrize("text, expected", [
    ("1.5GiB", int(1.5 * 2**30)), ("800MB", 800_000_000), ("800 MiB", 800 * 2**20), ("512M", 512 * 2**20),
    ("512MiB", 512 * 2**20), ("512MB", 512 * 10**6), ("3.5G", int(3.5 * 2**30)), ("3.5GiB", int(3.5 * 2**30)),
    ("3.5GB", int(3.5 * 10**9)), ("1K", 1024), ("1kB", 1000), ("1T", 2**40), ("1TB", 10**12),
    ("2g", 2 * 2**30), (123456, 123456), ("4096", 4096), ("1e3kB", 1_000_000), (2.0**30, 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "1.5 parsecs", "-1GiB", "0", True, None, float("nan"), "GiB", 1.5, "1.5", "2.5B"])
def test_parse_size_refuses_nonsense_with_an_example(bad):
    with pytest.raises(InputError, match="1.5GiB"):
        parse_size(bad)


def test_fractional_bytes_are_refused_not_truncated():
    with pytest.raises(InputError, match=r"memory size 1\.5 is not a whole number of bytes"):
        parse_size(1.5)


def test_plan_is_the_largest_batch_under_the_budget_and_names_the_minimum():
    mib = 2**20
    profile = MemoryProfile(fixed_bytes=100 * mib, per_tile_bytes=10 * mib)
    budget = 400 * mib
    plan = plan_batch(profile, budget, image_bytes=50 * mib, accumulator_bytes=10 * mib)
    # (400 - 40 margin - 100 - 50 - 10) / 10 = 20 tiles
    assert plan.batch_size == 20 and plan.margin_bytes == int(budget * MARGIN_FRACTION)
    assert plan.predicted_peak_bytes + plan.margin_bytes <= budget
    assert plan_batch(profile, budget, 50 * mib, 10 * mib, tiles=6).batch_size == 6  # no more than the image has
    assert plan_batch(profile, 100 * 2**30, 0, 0).batch_size == 32  # capped
    with pytest.raises(MemoryBudgetError, match=r"cannot be met.*at least 188\.89 MiB") as info:
        plan_batch(profile, 150 * mib, 50 * mib, 10 * mib)
    minimum = int(str(info.value).split("one tile needs ")[1].split("(")[1].split(" bytes")[0])
    assert plan_batch(profile, minimum, 50 * mib, 10 * mib).batch_size == 1


def test_segment_buffers_grow_with_width_not_area():
    _, acc_2048 = segment_buffers(2048, 2048, 256, 192, 2)
    _, acc_tall = segment_buffers(8192, 2048, 256, 192, 2)
    image_2048, _ = segment_buffers(2048, 2048, 256, 192, 2)
    assert acc_tall == acc_2048
    assert image_2048 == 2048 * 2048 * (3 + 1 + 4)  # image + uint8 mask + float32 heatmap


# --------------------------------------------------------------------------- with a real bundle


@pytest.fixture(scope="module")
def big_tile_bundle(tmp_path_factory):
    """A conv segmenter with 256 px tiles (8192^2 = 1849 tiles: seconds, not minutes)."""
    pytest.importorskip("torch")
    from edgederm.export import export_bundle
    from tests.tiny_models import ConvSegmenter

    model = ConvSegmenter(kernel=3, hidden=4, img_size=256).eval()
    return export_bundle(model, tmp_path_factory.mktemp("memory") / "seg256", progress=lambda m: None)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDERM_CACHE", str(tmp_path / "cache"))


def test_budget_too_small_is_refused_with_the_minimum_and_the_minimum_loads(big_tile_bundle):
    with pytest.raises(MemoryBudgetError, match=r"memory budget 100\.00 MiB.*2048x2048 image.*Fix: give memory_budget of at least") as info:
        load(big_tile_bundle, memory_budget="100MiB")
    minimum = int(str(info.value).split("one tile needs ")[1].split("(")[1].split(" bytes")[0])
    model = load(big_tile_bundle, memory_budget=minimum)
    assert model.memory_plan is not None and model.memory_plan.batch_size == 1
    assert load(big_tile_bundle, memory_budget="1.5GiB").memory_plan.batch_size > 1


_WORKER = textwrap.dedent("""
    import json, sys
    import cv2, numpy as np
    from edgederm.data.synthetic import generate_case
    from edgederm.runtime import load
    from edgederm.runtime.rss import current_rss_bytes, peak_rss_bytes
    bundle, side, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model = load(bundle, memory_budget=None if budget == "none" else budget, cache=False)
    # Cheap large image: one 256 px synthetic case resized (generate_case at 8192 is slow).
    image = cv2.resize(generate_case(seed=3, size=256).image, (side, side), interpolation=cv2.INTER_LINEAR)
    before = current_rss_bytes()
    result = model.predict(dermoscopy=image)
    print(json.dumps({"peak": peak_rss_bytes(), "before": before, "arrays": image.nbytes + result.mask.nbytes
                      + result.heatmap.nbytes, "plan": model.last_run["plan"], "tiles": model.last_run["tiles"],
                      "torch": "torch" in sys.modules}))
""")


def _measure(bundle, side: int, budget: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(bundle), str(side), budget],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_flat_from_2048_to_8192_and_under_the_budget(big_tile_bundle, record_property):
    mib = 2**20
    # Same tile batch (the bundle's) at both sizes, so only the image size differs.
    small, large = _measure(big_tile_bundle, 2048, "none"), _measure(big_tile_bundle, 8192, "none")
    assert not small["torch"] and not large["torch"]
    assert large["tiles"] == 43 * 43 and small["plan"]["batch_size"] == large["plan"]["batch_size"]
    # The caller's image and the results at input resolution (uint8 mask, float32
    # heatmap) are 16x larger at 8192^2 by definition (8 bytes/pixel: 512 MiB vs
    # 32 MiB), so the whole-process peak cannot be flat; everything else must be.
    working_small, working_large = small["peak"] - small["arrays"], large["peak"] - large["arrays"]
    record_property("figure:peak_rss_2048_MiB", f"{small['peak'] / mib:.0f} (arrays {small['arrays'] / mib:.0f})")
    record_property("figure:peak_rss_8192_MiB", f"{large['peak'] / mib:.0f} (arrays {large['arrays'] / mib:.0f})")
    record_property("figure:peak_minus_arrays_8192_over_2048", f"{working_large / working_small:.3f}")
    assert working_large <= 1.2 * working_small
    # Under a budget the planner picks the batch; the measured peak stays under it
    # and under the planner's own prediction (measured line + computed buffers).
    budget = "900MiB"
    planned = _measure(big_tile_bundle, 8192, budget)
    record_property("figure:peak_rss_8192_under_900MiB", f"{planned['peak'] / mib:.0f} MiB, "
                    f"batch {planned['plan']['batch_size']}, predicted {planned['plan']['predicted_peak_bytes'] / mib:.0f} MiB")
    assert planned["peak"] <= parse_size(budget)
    assert planned["peak"] <= planned["plan"]["predicted_peak_bytes"] + planned["plan"]["margin_bytes"]


# --------------------------------------------------------------------------- optimised-graph cache


def test_optimised_graph_cache_is_reused_checked_and_can_be_turned_off(big_tile_bundle, tmp_path, monkeypatch):
    image = np.ascontiguousarray(np.random.default_rng(0).integers(0, 256, (300, 280, 3), dtype=np.uint8))
    first = load(big_tile_bundle)
    assert first.cache_hits == {"segmenter": False}
    second = load(big_tile_bundle)
    assert second.cache_hits == {"segmenter": True}
    np.testing.assert_allclose(first.predict(dermoscopy=image).heatmap, second.predict(dermoscopy=image).heatmap,
                               atol=1e-6)
    cached = [p for p in (tmp_path / "cache").glob("*.onnx")]
    assert len(cached) == 1
    cached[0].write_bytes(cached[0].read_bytes()[:-10] + b"0123456789")  # damaged cache: detected, rebuilt
    third = load(big_tile_bundle)
    assert third.cache_hits == {"segmenter": False}
    np.testing.assert_allclose(third.predict(dermoscopy=image).heatmap, second.predict(dermoscopy=image).heatmap,
                               atol=1e-6)
    monkeypatch.setenv("EDGEDERM_CACHE", "off")
    off = tmp_path / "cache"
    before = sorted(off.iterdir())
    assert load(big_tile_bundle).cache_hits == {}
    assert sorted(off.iterdir()) == before


# --------------------------------------------------------------------------- budgets: refused, not noted


def test_every_bundle_has_a_measured_profile_classifiers_included(tiny_bundle):
    """A classifier export measures its memory line too (the whole-image stage), so a plan exists."""
    from edgederm.runtime.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    assert manifest.tiled_stage is None and manifest.memory is not None
    assert manifest.memory.stage == "classifier" and manifest.memory.fixed_bytes > 30 * 2**20
    model = load(tiny_bundle, precision="fp32", memory_budget="1GiB")
    assert model.memory_plan is not None and model.memory_plan.batch_size == 1
    assert not any("cannot be planned" in n for n in model.notes)


@pytest.mark.parametrize("budget, match", [
    ("1MiB", r"memory budget 1\.00 MiB \(1048576 bytes\) cannot be met for a 2048x2048 image: one tile needs"),
    ("10TB", r"memory budget .* is more than this machine has .*Fix: give memory_budget of at most"),
])
def test_impossible_budgets_are_refused_with_the_numbers(tiny_bundle, budget, match):
    with pytest.raises(MemoryBudgetError, match=match):
        load(tiny_bundle, precision="fp32", memory_budget=budget)
    with pytest.raises(InputError, match="not a whole number of bytes"):
        load(tiny_bundle, precision="fp32", memory_budget=1.5)


def test_build_and_load_read_a_budget_as_the_same_bytes(tiny_bundle):
    """``--memory-budget 3.5G`` is 3.5 GiB to `edgederm build` (TensorRT tactic memory = budget / 2)
    and to load() (the plan's budget): one parser."""
    from edgederm.export.tensorrt import memory_limits

    model = load(tiny_bundle, precision="fp32", memory_budget="3.5G", plan_image_size=256)
    assert model.memory_budget_bytes == int(3.5 * 2**30)
    assert model.memory_plan is not None and model.memory_plan.budget_bytes == int(3.5 * 2**30)
    assert memory_limits("3.5G", None)[1] == int(3.5 * 2**30) // 2
    assert memory_limits("3.5GB", None)[1] == int(3.5 * 10**9) // 2
