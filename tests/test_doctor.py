"""`edgederm doctor` on recorded Jetson system files (tests/recorded/jetson/<release>/, one per release)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgederm.doctor import (device_facts, engine_mismatches, mismatches, parse_cuda_version, parse_tegra_release,
                             parse_tensorrt_header, target_mismatches)
from edgederm.runtime.targets import load_target

RECORDED = Path(__file__).resolve().parent / "recorded" / "jetson"
REPO = Path(__file__).resolve().parents[1]

# release folder -> (L4T, TensorRT, CUDA, the profiles of that release)
EXPECTED = {
    "r32.7.1-jetson-nano": ("32.7.1", "8.2.1.8", "10.2.300", []),
    "r35.4.1-orin-nano-4gb": ("35.4.1", "8.5.2.2", "11.4.19", ["jetson-orin-nano-4gb-jp5"]),
    "r36.3.0-orin-nx-8gb": ("36.3.0", "8.6.2.3", "12.2.140", ["jetson-orin-nx-jp60"]),
    "r36.4.0-orin-nano-8gb": ("36.4.0", "10.3.0.30", "12.6.68",
                              ["jetson-agx-orin-jp6", "jetson-orin-nano-8gb-jp6", "jetson-orin-nx-jp6"]),
    "r36.4.3-agx-orin-32gb": ("36.4.3", "10.3.0.30", "12.6.68",
                              ["jetson-agx-orin-jp6", "jetson-orin-nano-8gb-jp6", "jetson-orin-nx-jp6"]),
}


@pytest.mark.parametrize("release", sorted(EXPECTED))
def test_recorded_release_facts(release):
    l4t, trt, cuda, targets = EXPECTED[release]
    facts = device_facts(RECORDED / release, python="3.8.10", probe_modules=False)
    assert facts.l4t is not None and facts.l4t.version == l4t
    assert (facts.tensorrt, facts.cuda, facts.targets) == (trt, cuda, targets)
    assert facts.tensorrt_source.endswith("NvInferVersion.h")
    assert facts.memory_total_bytes is not None and facts.memory_available_bytes < facts.memory_total_bytes


def test_parsers_on_their_formats():
    board = parse_tegra_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x")
    assert (board.major, board.revision, board.board, board.version) == (36, "4.3", "generic", "36.4.3")
    assert parse_tegra_release("Ubuntu 22.04") is None
    assert parse_tensorrt_header("#define TRT_MAJOR_ENTERPRISE 10\n#define TRT_MINOR_ENTERPRISE 8\n"
                                 "#define TRT_PATCH_ENTERPRISE 0\n#define TRT_BUILD_ENTERPRISE 43\n") == "10.8.0.43"
    assert parse_tensorrt_header("nothing") is None
    assert parse_cuda_version('{"cuda": {"version": "12.6.68"}}') == "12.6.68"
    assert parse_cuda_version("CUDA Version 10.2.300\n") == "10.2.300"


def test_a_device_of_its_target_has_no_mismatch():
    own = {"r35.4.1-orin-nano-4gb": "jetson-orin-nano-4gb-jp5", "r36.3.0-orin-nx-8gb": "jetson-orin-nx-jp60",
           "r36.4.0-orin-nano-8gb": "jetson-orin-nano-8gb-jp6", "r36.4.3-agx-orin-32gb": "jetson-agx-orin-jp6"}
    for release, target in own.items():
        facts = device_facts(RECORDED / release, python="3.10.12" if release.startswith("r36") else "3.8.10",
                             probe_modules=False)
        assert target_mismatches(facts, load_target(target)) == [], (release, target)


def test_jetpack5_bundle_on_a_jetpack6_device_names_every_mismatch():
    facts = device_facts(RECORDED / "r36.4.0-orin-nano-8gb", python="3.10.12", probe_modules=False)
    problems = target_mismatches(facts, load_target("jetson-orin-nano-4gb-jp5"))
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "this device runs R36.4.0" in text and "export for jetson-agx-orin-jp6" in text
    assert "TensorRT 8.5.2; this machine has TensorRT 10.3.0.30" in text
    assert "CUDA 11.4; this device has CUDA 12.6.68" in text
    assert "ships Python 3.8" in text


def test_small_device_for_a_big_target_is_named():
    facts = device_facts(RECORDED / "r36.4.0-orin-nano-8gb", python="3.10.12", probe_modules=False)
    problems = target_mismatches(facts, load_target("jetson-agx-orin-jp6"))
    assert len(problems) == 1 and "32.0 GiB of memory; this device has 7.3 GiB" in problems[0]


def test_engine_mismatches():
    facts = device_facts(RECORDED / "r35.4.1-orin-nano-4gb", python="3.8.10", probe_modules=False)
    engines = [
        {"file": "a.engine", "stage": "classifier", "precision": "fp16",
         "target": {"tensorrt_version": "8.5.2.2", "compute_capability": "8.7"}},  # fits
        {"file": "b.engine", "stage": "classifier", "precision": "int8",
         "target": {"tensorrt_version": "10.3.0", "compute_capability": "8.7"}},
        {"file": "c.engine", "stage": "classifier", "precision": "fp16",
         "target": {"tensorrt_version": "8.5.2.2", "compute_capability": "8.9"}},
        {"file": "d.engine", "stage": "classifier", "precision": "fp16"},
    ]
    problems = engine_mismatches(facts, engines)
    assert len(problems) == 3
    assert "'b.engine'" in problems[0] and "built with TensorRT 10.3.0; this machine has 8.5.2.2" in problems[0]
    assert "'c.engine'" in problems[1] and "compute capability 8.9; this Jetson has 8.7" in problems[1]
    assert "'d.engine'" in problems[2] and "records no TensorRT version" in problems[2]
    no_trt = device_facts(RECORDED / "r35.4.1-orin-nano-4gb", python="3.8.10", probe_modules=False)
    no_trt.tensorrt = None
    assert "no TensorRT found" in engine_mismatches(no_trt, engines[:1])[0]


def test_mismatches_of_a_manifest():
    facts = device_facts(RECORDED / "r35.4.1-orin-nano-4gb", python="3.8.10", probe_modules=False)
    manifest = {"target": {"name": "jetson-orin-nano-8gb-jp6"},
                "engines": [{"file": "e", "stage": "s", "precision": "fp16",
                             "target": {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7"}}]}
    problems = mismatches(facts, manifest)
    assert any("made for jetson-orin-nano-8gb-jp6" in p for p in problems)
    assert any("'e'" in p and "TensorRT 10.3.0.30" in p for p in problems)
    assert "not a profile this SDK knows" in mismatches(facts, {"target": {"name": "nano"}})[0]


@pytest.mark.slow
def test_doctor_cli_exit_status(bundle_copy):
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["target"] = {"name": "jetson-orin-nano-4gb-jp5"}
    manifest_path.write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "edgederm.cli", "doctor", "--bundle", str(bundle_copy), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    report = json.loads(proc.stdout)
    if report["jetson"] == "no":  # this machine: the Jetson target cannot match
        assert proc.returncode == 1 and "this machine is not a Jetson" in report["mismatches"][0]
    plain = subprocess.run([sys.executable, "-m", "edgederm.cli", "doctor"], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert plain.returncode == 0 and "mismatch" not in plain.stdout


@pytest.mark.parametrize("release,kernel,features", [
    ("r36.4.3-agx-orin-32gb", "arm-dot", "asimd asimddp"),  # Cortex-A78AE: ARMv8.2 dot product
    ("r32.7.1-jetson-nano", "arm-no-dot", "asimd"),  # Cortex-A57: ARMv8.0
])
def test_doctor_reports_the_int8_kernel_class(release, kernel, features):
    from edgederm.doctor import diagnose

    report = diagnose(root=RECORDED / release)
    assert report["cpu_features"] == features
    assert report["int8_kernel_class"].startswith(f"{kernel}: ")
