"""Target profiles (runtime/target_profiles/*.json): every fact sourced, tables consistent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgederm.runtime.errors import EdgeDermError
from edgederm.runtime.targets import PROFILE_DIR, UnknownTargetError, all_targets, load_target, target_names

TABLES = Path(__file__).resolve().parents[2] / "export" / "parser_tables"
REQUIRED = {"jetson-orin-nano-4gb-jp5", "jetson-orin-nano-8gb-jp6", "jetson-orin-nx-jp6", "jetson-agx-orin-jp6", "x86-trt10"}


def test_required_targets_exist():
    assert REQUIRED <= set(target_names())


@pytest.mark.parametrize("name", target_names())
def test_every_stated_fact_has_a_source(name):
    data = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    stated = {f"{section}.{key}" for section in ("device", "software", "onnx", "memory_plan")
              for key, value in data[section].items() if value not in (None, [], "") and key not in ("jetson", "measured")}
    assert stated - set(data["sources"]) == set(), "facts without a source"
    assert set(data["sources"].values()) <= set(data["references"]), "a source id without a reference"
    for ref in data["references"].values():
        assert ref["url"].startswith("https://") and ref["title"]


@pytest.mark.parametrize("name", target_names())
def test_profile_agrees_with_its_parser_table(name):
    profile = load_target(name)
    table = json.loads((TABLES / f"tensorrt-{profile.parser_table}.json").read_text())
    assert profile.max_opset == table["max_opset"]
    assert profile.tensorrt_major_minor == tuple(int(v) for v in table["tensorrt"].split("."))
    if profile.jetson:
        assert profile.unified_memory and profile.compute_capability == "8.7" and profile.l4t


def test_known_facts_of_the_jetpack5_nano():
    nano = load_target("jetson-orin-nano-4gb-jp5")
    assert (nano.tensorrt, nano.cuda, nano.python, nano.max_opset, nano.dla_cores) == ("8.5.2", "11.4", "3.8", 17, 0)
    assert nano.memory_bytes == 4 << 30
    assert nano.l4t_matches("35.4.1") and not nano.l4t_matches("36.4.0") and not nano.l4t_matches("35.40")
    assert nano.source_of("software.tensorrt").url.startswith("https://developer.nvidia.com/embedded/jetpack")


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UnknownTargetError, match="unknown target 'orin'.*jetson-orin-nano-4gb-jp5.*x86-trt10"):
        load_target("orin")


def test_malformed_profile_is_a_typed_error(tmp_path, monkeypatch):
    import edgederm.runtime.targets as targets

    (tmp_path / "broken.json").write_text(json.dumps({"name": "broken", "device": {}}))
    monkeypatch.setattr(targets, "PROFILE_DIR", tmp_path)
    with pytest.raises(EdgeDermError, match="broken.json is malformed"):
        targets.load_target("broken")


def test_profiles_load_without_torch_or_onnx():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "from edgederm.runtime.targets import all_targets; print(len(all_targets()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert int(out.stdout) == len(target_names())


def test_docs_list_every_profile_fact_and_source():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "scripts/target_profiles_doc.py", "--out", "docs/target-profiles.md", "--check"],
                          capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    text = (repo / "docs" / "target-profiles.md").read_text()
    for profile in all_targets():
        assert f"## {profile.name}" in text
        assert all(ref.url in text for ref in profile.sources.values())


@pytest.mark.parametrize("release, expected", [
    ("r35.4.1-orin-nano-4gb", "jetson-orin-nano-4gb-jp5"),
    ("r36.3.0-orin-nx-8gb", "jetson-orin-nx-jp60"),
    ("r36.4.3-agx-orin-32gb", "jetson-agx-orin-jp6"),
    ("r36.4.0-orin-nano-8gb", None),  # Orin Nano 8GB and Orin NX 8GB share R36.4 and 8 GiB: not told apart
    ("r32.7.1-jetson-nano", None),  # JetPack 4: no profile
])
def test_detect_target_from_recorded_device_files(release, expected):
    from edgederm.runtime.targets import detect_target

    found = detect_target(Path(__file__).resolve().parents[1] / "recorded" / "jetson" / release)
    assert (found.name if found else None) == expected


def test_no_target_off_a_jetson(tmp_path):
    from edgederm.runtime.targets import detect_target

    assert detect_target(tmp_path) is None
