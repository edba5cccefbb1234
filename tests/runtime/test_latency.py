"""precision="auto" on CPU: interleaved medians, the margin, re-measuring on another CPU
and the per-CPU cache. Timings are injected; no test asserts a real measured speed."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from edgederm.runtime import latency
from edgederm.runtime.backends import onnxruntime as ort_backend
from edgederm.runtime.latency import MIN_ROUNDS, ROUNDS, cpu_speedups, interleaved_medians
from edgederm.runtime.selection import SPEEDUP_MARGIN, auto_precision_note, fastest_measured_on_cpu


class FakeClock:
    """A clock that only the fake runners move: each run costs its planned milliseconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str, ms: float, spike_ms: float = 0.0, spike_runs: tuple[int, ...] = ()):
        def run() -> None:
            self.calls.append(name)
            n = self.calls.count(name) - 1  # 0: the warm-up
            self.now += (ms + (spike_ms if n in spike_runs else 0.0)) / 1000
        return run


def test_rounds_alternate_the_variants_and_rotate_the_order():
    clock = FakeClock()
    runners = {p: clock.runner(p, 10.0) for p in ("fp32", "int8", "int8_dynamic")}
    measured = interleaved_medians(runners, clock=clock)
    assert measured.rounds == ROUNDS
    assert clock.calls[:3] == ["fp32", "int8", "int8_dynamic"]  # warm-up, untimed
    rounds = [clock.calls[3 + 3 * r: 6 + 3 * r] for r in range(ROUNDS)]
    assert rounds[0] == ["fp32", "int8", "int8_dynamic"] and rounds[1] == ["int8", "int8_dynamic", "fp32"]
    assert all(sorted(r) == ["fp32", "int8", "int8_dynamic"] for r in rounds)  # one run each per round


def test_a_load_spike_in_one_variants_rounds_does_not_flip_the_choice():
    clock = FakeClock()
    # int8 is 20% faster, but three of its seven timed runs land in a 60 ms load spike
    # (a mean would charge it 8 + 3 * 60 / 7 = 33.7 ms, three times fp32)
    runners = {"fp32": clock.runner("fp32", 10.0), "int8": clock.runner("int8", 8.0, 60.0, spike_runs=(1, 2, 3))}
    measured = interleaved_medians(runners, clock=clock)
    assert measured.ms == {"fp32": pytest.approx(10.0), "int8": pytest.approx(8.0)}
    assert measured.speedups() == {"int8": pytest.approx(1.25)}
    bundle = SimpleNamespace(calibration={"int8": {"target": {"reached": True}}})
    assert fastest_measured_on_cpu(bundle, ["fp32", "int8"], measured.speedups()) == "int8"  # type: ignore[arg-type]


def test_rounds_stop_at_the_time_budget_but_never_below_the_minimum():
    clock = FakeClock()
    runners = {"fp32": clock.runner("fp32", 400.0), "int8": clock.runner("int8", 400.0)}
    assert interleaved_medians(runners, clock=clock).rounds == MIN_ROUNDS


@pytest.mark.parametrize("speedups, calibration, expected", [
    ({"int8": 1.3}, {}, "int8"),
    ({"int8": SPEEDUP_MARGIN}, {}, "fp32"),  # not above the margin
    ({"int8": 0.78, "int8_dynamic": 1.12}, {}, "int8_dynamic"),
    ({"int8": 1.6, "int8_dynamic": 1.12}, {"int8": {"target": {"reached": False}}}, "int8_dynamic"),  # missed its target
    ({"int8": 1.6, "int8_dynamic": 1.02}, {"int8": {"target": {"reached": False}}}, "fp32"),
])
def test_the_choice_needs_the_margin_and_the_agreement_target(speedups, calibration, expected):
    bundle = SimpleNamespace(calibration=calibration)
    available = ["fp32", *speedups]
    assert fastest_measured_on_cpu(bundle, available, speedups) == expected  # type: ignore[arg-type]
    note = auto_precision_note(bundle, expected, speedups, "measured here, median of 7 interleaved rounds")  # type: ignore[arg-type]
    assert note.startswith(f"precision auto: {expected} (") and note.endswith("median of 7 interleaved rounds)")
    for p, x in speedups.items():
        assert f"{p} {x:.2f}x" in note


def _fake_bundle(recorded_cpu: str):
    stage = SimpleNamespace(name="model", graphs={p: SimpleNamespace(file=f"model.{p}.onnx") for p in ("fp32", "int8")})
    return SimpleNamespace(
        stages=[stage], verified={f"model.{p}.onnx": f"{i}" * 64 for i, p in enumerate(("fp32", "int8"))},
        calibration={"int8": {"latency": {"speedup": 1.4, "cpu": recorded_cpu}}})


@pytest.fixture()
def fake_measure(monkeypatch):
    """Counts the measurements; each one finds int8 at 0.5x fp32 (timings injected)."""
    opened: list[str] = []

    def runner(manifest, stages, planner):
        clock_ms = {"fp32": 10.0, "int8": 20.0}[stages["precision"]]
        return lambda: clock_ms

    def measure(runners, **_):
        return latency.Measurement({p: runners[p]() for p in runners}, 5)

    monkeypatch.setattr(latency, "pipeline_runner", runner)
    monkeypatch.setattr(latency, "interleaved_medians", measure)
    monkeypatch.setattr(ort_backend, "cpu_identity", lambda: "x86_64|this-cpu")

    def open_stages(p):
        opened.append(p)
        return {"precision": p}
    return open_stages, opened


def test_the_quantize_time_measurement_is_used_on_the_same_cpu(fake_measure, tmp_path):
    open_stages, opened = fake_measure
    speedups, source = cpu_speedups(_fake_bundle("x86_64|this-cpu"), ["int8"], None, tmp_path, open_stages, None)  # type: ignore[arg-type]
    assert speedups == {"int8": 1.4} and source == "measured on this CPU at quantize time"
    assert opened == [] and list(tmp_path.iterdir()) == []


def test_another_cpu_measures_again_then_reuses_the_cache(fake_measure, tmp_path):
    open_stages, opened = fake_measure
    bundle = _fake_bundle("aarch64|quantizing-cpu")
    speedups, source = cpu_speedups(bundle, ["int8"], None, tmp_path, open_stages, None)  # type: ignore[arg-type]
    assert speedups == {"int8": 0.5} and source == "measured here, median of 5 interleaved rounds"
    assert opened == ["fp32", "int8"]
    [cached] = list(tmp_path.iterdir())
    assert cached.name.startswith("latency-") and json.loads(cached.read_text())["ms"] == {"fp32": 10.0, "int8": 20.0}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written atomically

    speedups, source = cpu_speedups(bundle, ["int8"], None, tmp_path, open_stages, None)  # type: ignore[arg-type]
    assert speedups == {"int8": 0.5} and source.startswith("measured on this CPU earlier")
    assert opened == ["fp32", "int8"]  # nothing opened or measured again

    other_threads = cpu_speedups(bundle, ["int8"], 1, tmp_path, open_stages, None)  # type: ignore[arg-type]
    assert other_threads[1].startswith("measured here") and len(list(tmp_path.iterdir())) == 2  # threads key it


def test_a_tampered_cache_is_measured_again(fake_measure, tmp_path, caplog):
    open_stages, opened = fake_measure
    bundle = _fake_bundle("aarch64|quantizing-cpu")
    cpu_speedups(bundle, ["int8"], None, tmp_path, open_stages, None)  # type: ignore[arg-type]
    [cached] = list(tmp_path.iterdir())
    data = json.loads(cached.read_text())
    data["ms"]["int8"] = 1.0  # would make int8 look 10x faster
    cached.write_text(json.dumps(data))
    speedups, source = cpu_speedups(bundle, ["int8"], None, tmp_path, open_stages, None)  # type: ignore[arg-type]
    assert speedups == {"int8": 0.5} and source.startswith("measured here")
    assert "does not match its recorded sha256" in caplog.text
    assert json.loads(cached.read_text())["ms"]["int8"] == 20.0  # rewritten


def test_load_on_another_cpu_measures_and_says_so(tiny_bundle, tmp_path, monkeypatch):
    from edgederm.runtime import load

    monkeypatch.setenv("EDGEDERM_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_backend, "cpu_identity", lambda: "riscv64|not-the-quantizing-cpu")
    first = load(tiny_bundle)
    [note] = [n for n in first.notes if n.startswith("precision auto:")]
    assert note.startswith(f"precision auto: {first.precision} (int8 ") and "interleaved rounds" in note
    assert "measured here" in note and first.precision in ("fp32", "int8")
    assert len(list(tmp_path.glob("latency-*.json"))) == 1
    second = load(tiny_bundle)
    assert second.precision == first.precision
    assert any("measured on this CPU earlier" in n for n in second.notes)
    assert first.cache_hits == {"classifier": False} and second.cache_hits == {"classifier": True}
    result = second.predict(dermoscopy=np.zeros((64, 64, 3), np.uint8))
    assert any(n.startswith("precision auto:") for n in result.notes)
