"""The CPU-feature reader on recorded /proc/cpuinfo texts, the int8 kernel classes and forms,
and the per-graph record of the CPU an int8 graph was quantized on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgederm.runtime import cpu as cpu_module
from edgederm.runtime.bundle import parse_manifest
from edgederm.runtime.cpu import (KERNEL_CLASSES, arithmetic_differs, int8_form, kernel_class, parse_cpuinfo,
                                  read_cpu_features, saturates)
from edgederm.runtime.errors import ManifestError

RECORDED = Path(__file__).resolve().parents[1] / "recorded"
CPUINFO = {
    "haswell": RECORDED / "cpuinfo" / "x86-haswell-avx2.txt",
    "skylake-sp": RECORDED / "cpuinfo" / "x86-skylake-sp-avx512-no-vnni.txt",
    "zen5": RECORDED / "cpuinfo" / "x86-zen5-avx512-vnni.txt",
    "sapphire-rapids": RECORDED / "cpuinfo" / "x86-sapphire-rapids-amx.txt",
    "orin": RECORDED / "jetson" / "r36.4.3-agx-orin-32gb" / "proc" / "cpuinfo",
    "nano": RECORDED / "jetson" / "r32.7.1-jetson-nano" / "proc" / "cpuinfo",
}
# name -> (arch, class, int8 features)
EXPECTED = {
    "haswell": ("x86_64", "avx2", ("sse4_1", "avx2", "fma")),
    "skylake-sp": ("x86_64", "avx2", ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")),
    "zen5": ("x86_64", "vnni", ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                "avx_vnni", "avx512_bf16")),
    "sapphire-rapids": ("x86_64", "amx", ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                          "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")),
    "orin": ("aarch64", "arm-dot", ("asimd", "asimddp")),
    "nano": ("aarch64", "arm-no-dot", ("asimd",)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_cpuinfo(name):
    arch, kernel, features = EXPECTED[name]
    found = parse_cpuinfo(CPUINFO[name].read_text())
    assert (found.arch, found.kernel_class, found.int8_features) == (arch, kernel, features)
    assert found.source == "/proc/cpuinfo"
    # A path other than this machine's /proc/cpuinfo is read for what it says (doctor on a device's files).
    assert read_cpu_features(CPUINFO[name]).kernel_class == kernel


def test_reader_stops_at_the_first_processor_and_ignores_vmx_flags():
    text = CPUINFO["haswell"].read_text()
    assert text.count("flags\t\t:") == 2 and "vmx flags" in text
    found = parse_cpuinfo(text)
    assert "ept_x_only" not in found.features  # a "vmx flags" entry
    assert found.model == "Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz"


def test_identity_is_the_architecture_and_a_digest_of_every_flag():
    found = parse_cpuinfo(CPUINFO["zen5"].read_text(), "x86_64")
    flags = next(line for line in CPUINFO["zen5"].read_text().splitlines() if line.startswith("flags"))
    digest = hashlib.sha256(" ".join(sorted(flags.split(":", 1)[1].split())).encode()).hexdigest()[:16]
    assert found.identity == f"x86_64|{digest}"
    assert parse_cpuinfo(CPUINFO["haswell"].read_text()).identity != found.identity


def test_without_cpuinfo_the_platform_answers_and_nothing_is_claimed(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_module.platform, "machine", lambda: "AMD64")
    found = read_cpu_features(tmp_path / "missing")
    assert (found.arch, found.features, found.kernel_class, found.source) == ("x86_64", frozenset(), "other", "platform")
    assert "features unknown" in found.describe()
    assert parse_cpuinfo("", "arm64").kernel_class == "other"
    assert parse_cpuinfo("garbage without colons\n\n\n").arch == "unknown"


@pytest.mark.parametrize("arch,flags,expected", [
    ("x86_64", {"sse4_1"}, "sse"),
    ("x86_64", set(), "other"),
    ("x86_64", {"avx2", "avx_vnni"}, "vnni"),  # AVX-VNNI without AVX-512 (Alder Lake)
    ("x86_64", {"avx2", "amx_tile"}, "avx2"),  # tiles without int8 support are not an int8 path
    ("aarch64", {"asimd", "asimddp", "i8mm"}, "arm-dot"),
    ("armv7l", {"neon"}, "arm-no-dot"),
    ("riscv64", {"v"}, "other"),
])
def test_kernel_class_rules(arch, flags, expected):
    assert kernel_class(arch, flags) == expected


def test_int8_form_per_class():
    for kernel in KERNEL_CLASSES:
        form = int8_form(kernel)
        assert form.reduce_range == saturates(kernel)
        assert form.reduce_range == (kernel in ("avx2", "sse", "other"))
    assert "32640" in int8_form("avx2").reason and "docs/int8-and-cpus.md" in int8_form("avx2").reason
    with pytest.raises(ValueError, match="unknown int8 kernel class 'avx3'"):
        int8_form("avx3")


@pytest.mark.parametrize("made_on,saturation_free,running,differs", [
    ("vnni", False, "avx2", True),  # exact where measured, saturating here
    ("avx2", False, "vnni", True),  # measured with saturation, exact here
    ("vnni", False, "amx", False),
    ("vnni", False, "arm-dot", False),
    ("avx2", False, "sse", False),
    ("vnni", True, "avx2", False),  # 7-bit weights: the same numbers everywhere
    ("vnni", False, "other", True),
    ("other", False, "other", False),
])
def test_arithmetic_differs(made_on, saturation_free, running, differs):
    assert arithmetic_differs(made_on, saturation_free, running) is differs


def _manifest_with(record):
    graphs = {"fp32": {"file": "a.onnx", "sha256": "0" * 64}, "int8": {"file": "b.onnx", "sha256": "1" * 64}}
    if record is not None:
        graphs["int8"]["cpu"] = record
    return {"format": "edgederm-bundle", "model": {"name": "m", "task": "classify", "class_names": ["a", "b"]},
            "stages": [{"name": "classifier", "inputs": [{"name": "x", "shape": ["batch", 3, 8, 8]}],
                        "outputs": [{"name": "logits", "shape": ["batch", 2]}], "graphs": graphs}],
            "files": {"a.onnx": {"sha256": "0" * 64}, "b.onnx": {"sha256": "1" * 64}}}


def test_graph_record_is_typed_and_optional(tmp_path):
    record = {"made_on": {"class": "vnni", "arch": "x86_64", "features": ["avx2", "avx512_vnni"]},
              "made_for": "avx2", "saturation_free": True, "form": "u8 activations, 7-bit weights (reduce_range)"}
    made = parse_manifest(_manifest_with(record), tmp_path).stages[0].graphs["int8"].quantized_on
    assert made is not None
    assert (made.kernel_class, made.made_for, made.saturation_free, made.arch, made.features) == \
        ("vnni", "avx2", True, "x86_64", ("avx2", "avx512_vnni"))
    # A bundle quantized before the record existed: no record, nothing claimed.
    assert parse_manifest(_manifest_with(None), tmp_path).stages[0].graphs["int8"].quantized_on is None


@pytest.mark.parametrize("change,field", [
    ({"made_for": "avx3"}, "made_for"),
    ({"made_on": {"class": "z80"}}, "made_on.class"),
    ({"saturation_free": "yes"}, "cpu"),
    ({"made_on": {"class": "vnni", "features": "avx2"}}, "made_on.features"),
])
def test_malformed_graph_record_names_the_field(tmp_path, change, field):
    record = {"made_on": {"class": "vnni", "arch": "x86_64", "features": []}, "made_for": "vnni",
              "saturation_free": False, **change}
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        parse_manifest(json.loads(json.dumps(_manifest_with(record))), tmp_path)
