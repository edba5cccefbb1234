"""The device side installs on Python 3.8 (JetPack 5); the release side says it needs 3.10+.

The code itself is checked on a real 3.8 interpreter by .ci/oldest-deps (imports, a
prediction, the runtime's torch-free tests) and by vermin (.ci/vermin.ini) in .ci/run;
here: the refusal, and that the package metadata says what those checks assume."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from edgederm.cli import RELEASE_SIDE_COMMANDS, require_release_python
from edgederm.runtime.errors import PythonVersionError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(RELEASE_SIDE_COMMANDS))
def test_release_side_commands_refuse_python_38_with_the_fix(command):
    with pytest.raises(PythonVersionError, match=rf"`edgederm {command}` needs Python 3\.10 or newer .* this is "
                                                 r"Python 3\.8\. Fix: run it on a machine with Python 3\.10\+"):
        require_release_python(command, (3, 8))
    require_release_python(command, (3, 10))


@pytest.mark.parametrize("command", ["predict", "plan", "doctor", "build", "selftest", "serve", "verify", "store"])
def test_device_commands_run_on_python_38(command):
    require_release_python(command, (3, 8))


def test_metadata_allows_38_and_marks_the_torch_side_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.8"
    for extra in ("train", "export"):
        for requirement in project["optional-dependencies"][extra]:
            assert requirement.endswith("; python_version >= '3.10'"), requirement
    torch_side = [r for r in project["optional-dependencies"]["dev"] if r.split(">")[0] in ("torch", "onnx", "timm", "monai")]
    assert torch_side and all(r.endswith("; python_version >= '3.10'") for r in torch_side)


def test_oldest_deps_check_installs_the_lower_bounds_of_the_base_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lower = dict(re.match(r"([\w-]+)>=([\d.]+)", r).groups() for r in project["dependencies"])
    script = (ROOT / ".ci" / "oldest-deps").read_text()
    pinned = dict(re.findall(r'"([\w-]+)==([\d.]+)"', script.split("OLDEST=(")[1].split(")")[0]))
    assert set(pinned) == set(lower)
    for name, version in pinned.items():
        assert version.startswith(lower[name]), (name, version, lower[name])


def test_serve_access_log_flags_without_boolean_optional_action():
    from edgederm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "b"]).access_log is True
    assert parser.parse_args(["serve", "b", "--no-access-log"]).access_log is False
    assert parser.parse_args(["serve", "b", "--no-access-log", "--access-log"]).access_log is True
