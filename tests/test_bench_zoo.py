"""``edgederm bench --all-models`` on tiny models: what it reports is measured and consistent.

No speed is asserted (the machine is shared; ratios are the command's output). The tests
check the structure of the report, that every engine ran or was skipped with a reason,
that torch and the fp32 graph hold the same weights, that the fractions are the achieved
figures over the peaks reported beside them, the round-robin order, the cold-start
figures and the cache states they were measured with, and the PNG.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")

from edgederm.bench_zoo import (  # noqa: E402
    TORCH_ENGINES,
    ZooBenchConfig,
    format_zoo_report,
    parse_models,
    parse_torch_engines,
    plot_zoo_report,
    run_zoo_bench,
)
from edgederm.runtime.errors import InputError  # noqa: E402

MODELS = ["cfformer_tiny", "remixformer_tiny"]
SIZE = 128


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("zoo")
    config = ZooBenchConfig(work=work, models=MODELS, rounds=2, size=SIZE, calib_images=2, calib_eval_images=1,
                            calib_size=128, torch_engines=("torch:fp32", "torch:bf16"), peak_n=256)
    messages: list[str] = []
    result = run_zoo_bench(config, say=messages.append)
    result["_messages"] = messages
    result["_work"] = work
    return result


def test_parse_models_and_engines():
    assert parse_models("hifuse_tiny, cfformer_tiny") == ["hifuse_tiny", "cfformer_tiny"]
    with pytest.raises(InputError, match=r"unknown \['nope'\].*hifuse_t"):
        parse_models("hifuse_tiny,nope")
    assert parse_torch_engines("none") == []
    assert parse_torch_engines("torch:bf16") == ["torch:bf16"]
    with pytest.raises(InputError, match="torch:fp32,torch:bf16,torch:compile"):
        parse_torch_engines("torch:int4")


def test_cli_bench_without_bundle_or_models_says_what_to_pass(capsys):
    from edgederm.cli import main

    assert main(["bench"]) == 2
    assert "--all-models" in capsys.readouterr().err


@pytest.mark.slow
def test_every_engine_ran_or_was_skipped_with_a_reason(report):
    assert [m["model"] for m in report["models"]] == MODELS
    json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, default=str)  # JSON-ready
    for entry in report["models"]:
        expected = {f"edgederm:{p}" for p in ("fp32", "int8", "int8_dynamic")} | {"torch:fp32", "torch:bf16"}
        assert set(entry["precisions"]) == {"fp32", "int8", "int8_dynamic"}
        assert set(entry["engines"]) | set(entry["skipped"]) == expected
        assert all(isinstance(why, str) and why for why in entry["skipped"].values())
        assert "edgederm:fp32" in entry["engines"] and "torch:fp32" in entry["engines"], entry["skipped"]
        for engine, data in entry["engines"].items():
            assert data["n_rounds"] == 2 and len(data["rounds"]) == 2
            assert data["latency_s"] == pytest.approx(float(np.median([t["latency_s"] for t in data["rounds"]])))
            assert data["peak_rss_bytes"] > 0 and data["setup"]["first_predict_s"] > 0
            # the timed prediction is the whole pipeline from the image file
            assert all(t["timings_ms"]["decode"] > 0 for t in data["rounds"])


@pytest.mark.slow
def test_torch_and_the_fp32_graph_hold_the_same_weights(report):
    for entry in report["models"]:
        diffs, relative = entry["weights_max_abs_diff"], entry["weights_max_rel_diff"]
        assert set(diffs) == set(relative) == set(entry["stages"])
        # relative to the output's scale, as the export's parity check measures (its rtol 1e-4)
        assert max(relative.values()) < 1e-4, (diffs, relative)
        assert all(0 <= diffs[s] < 1e-3 for s in diffs), diffs


@pytest.mark.slow
def test_decisions_are_compared_with_fp32(report):
    cfformer, remix = report["models"]
    assert cfformer["engines"]["edgederm:fp32"]["dice_vs_fp32"] == 1.0
    assert cfformer["engines"]["torch:fp32"]["dice_vs_fp32"] > 0.99  # same weights, same tiles
    assert remix["engines"]["edgederm:fp32"]["agreement_vs_fp32"] == 1.0
    assert remix["engines"]["torch:fp32"]["max_probability_diff_vs_fp32"] < 1e-3
    for entry in report["models"]:
        for precision in ("int8", "int8_dynamic"):
            assert entry["fidelity"][precision]["held_out"] is True  # quantize's own report, on held-out images


@pytest.mark.slow
def test_fractions_are_achieved_over_the_peak_of_the_stage_precision(report):
    from edgederm.runtime.tiling import make_grid

    peak = report["machine_peak"]
    assert peak["R"] == pytest.approx(peak["int8_gops"] / peak["fp32_gflops"])
    assert peak["int8_path"] in peak["start"]["int8_paths"] or peak["int8_path"] in peak["end"]["int8_paths"]
    peaks = {"fp32": peak["fp32_gflops"], "bf16": peak["bf16_gflops"], "int8": peak["int8_gops"]}
    cfformer, remix = report["models"]
    tiles = len(make_grid(SIZE, SIZE, 64, 0.25))
    assert cfformer["engines"]["edgederm:fp32"]["stages"]["segmenter"]["units"] == tiles
    windows = remix["engines"]["edgederm:fp32"]["stages"]["window_encoder"]["units"]
    assert windows == remix["engines"]["edgederm:fp32"]["rounds"][0]["run"]["windows"] > 1
    kinds = {"edgederm:fp32": "fp32", "edgederm:int8": "int8", "edgederm:int8_dynamic": "int8",
             "torch:fp32": "fp32", "torch:bf16": "bf16"}
    checked = 0
    for entry in report["models"]:
        for engine, data in entry["engines"].items():
            for stage, row in data["stages"].items():
                flops = entry["flops_per_unit"][stage]
                assert flops and flops > 0
                if not row["units"]:
                    continue
                assert row["peak"] == kinds[engine]
                assert row["achieved_gflops"] == pytest.approx(flops * row["units"] / (row["ms"] / 1000) / 1e9)
                assert row["fraction_of_peak"] == pytest.approx(row["achieved_gflops"] / peaks[kinds[engine]])
                checked += 1
    assert checked >= 2 * 5


@pytest.mark.slow
def test_engines_are_timed_round_robin(report):
    for entry in report["models"]:
        engines = list(entry["engines"])
        order = entry["order"]
        assert len(order) == 2 * len(engines)
        for r in range(2):
            in_round = [e for k, e in order if k == r]
            shift = r % len(engines)
            assert in_round == engines[shift:] + engines[:shift]  # each engine once, the start rotating


@pytest.mark.slow
def test_cold_start_with_an_empty_then_a_populated_cache(report):
    for entry in report["models"]:
        cold = entry["cold_start"]
        assert set(cold) == {f"edgederm:{p}" for p in ("fp32", "int8", "int8_dynamic")}
        for engine, figures in cold.items():
            steady = entry["engines"][engine]["latency_s"]
            assert figures["cache"] == "empty" and not any(figures["cache_hits"].values())
            warm = figures["warm"]
            assert warm["cache"] == "populated" and set(warm["cache_hits"]) == set(entry["stages"])
            assert all(warm["cache_hits"].values())  # the warm start read every stage from the cache
            assert figures["cold_over_steady"] == pytest.approx(
                (figures["load_s"] + figures["first_predict_s"]) / steady)
            assert warm["warm_over_steady"] == pytest.approx((warm["load_s"] + warm["first_predict_s"]) / steady)


@pytest.mark.slow
def test_ratios_table_and_plot(report, tmp_path):
    peak = report["machine_peak"]
    for entry in report["models"]:
        ratios = entry["ratios"]
        engines = entry["engines"]
        sdk = {e: d["latency_s"] for e, d in engines.items() if e.startswith("edgederm:")}
        assert ratios["sdk_fastest"] == min(sdk, key=sdk.get)
        assert ratios["sdk_fastest_vs_torch_fp32"] == pytest.approx(
            engines["torch:fp32"]["latency_s"] / sdk[ratios["sdk_fastest"]])
        assert ratios["target_0.8R"] == pytest.approx(0.8 * peak["R"])
    text = format_zoo_report(report)
    assert "0.8 R" in text and "R = int8/fp32" in text and report["cpu_features"] in text
    for engine in ("edgederm:int8_dynamic", "torch:bf16"):
        assert engine in text
    png = plot_zoo_report(report, tmp_path / "zoo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_second_run_reuses_the_work_folder(report):
    """Checkpoint, bundle and quantized graphs are reused when their stamps match."""
    from edgederm.bench_zoo import calibration_folder, prepare_model

    work = report["_work"]
    config = ZooBenchConfig(work=work, models=["cfformer_tiny"], calib_images=2, calib_eval_images=1, calib_size=128)
    messages: list[str] = []
    calib = calibration_folder(config, messages.append)
    bundle = work / "cfformer_tiny" / "bundle"
    before = (bundle / "manifest.json").stat().st_mtime_ns
    prepare_model("cfformer_tiny", config, calib, messages.append)
    assert messages == [] and (bundle / "manifest.json").stat().st_mtime_ns == before
    assert any("edgederm quantize --precision int8 " in m for m in report["_messages"])


@pytest.mark.slow
def test_torch_compile_runs_or_is_skipped_with_the_reason(tmp_path):
    config = ZooBenchConfig(work=tmp_path, models=["cfformer_tiny"], rounds=1, size=64, precisions=(),
                            torch_engines=("torch:compile",), cold_start=False, peak_n=128)
    entry = run_zoo_bench(config, say=lambda m: None)["models"][0]
    assert set(entry["engines"]) | set(entry["skipped"]) == {"edgederm:fp32", "torch:compile"}
    if "torch:compile" in entry["skipped"]:
        pytest.skip(f"torch.compile does not run here: {entry['skipped']['torch:compile']}")
    assert entry["engines"]["torch:compile"]["dice_vs_fp32"] > 0.99
    assert math.isfinite(entry["engines"]["torch:compile"]["latency_s"])


def test_torch_engine_names_are_the_documented_ones():
    assert TORCH_ENGINES == ("torch:fp32", "torch:bf16", "torch:compile")
