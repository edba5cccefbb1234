"""The `edgederm` command: every sub-command's help, JSON outputs, errors without tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pytest

from edgederm.cli import build_parser, main
from edgederm.data.synthetic import generate_case

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_required_commands_exist():
    assert {"quickstart", "train", "export", "quantize", "predict", "doctor", "models"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_useful_on_its_own(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"edgederm {command}" in text and len(text) > 200, text


def test_predict_json(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "case.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(generate_case(seed=4, size=400).image, cv2.COLOR_RGB2BGR))
    assert main(["predict", str(tiny_bundle), str(path), "--json", "--precision", "fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"label", "probabilities", "needs_review", "review_reasons", "backend", "precision", "timings_ms"}
    assert out["precision"] == "fp32" and out["backend"] == "onnxruntime-cpu"
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_bad_image_is_a_one_line_error_with_exit_2(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert main(["predict", str(tiny_bundle), str(path)]) == 2
    err = capsys.readouterr().err
    assert "empty.jpg" in err and "empty" in err and "Traceback" not in err


def test_bad_metadata_json_is_explained(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "case.png"
    cv2.imwrite(str(path), generate_case(seed=4, size=64).image)
    assert main(["predict", str(tiny_bundle), str(path), "--metadata", "{age: 5"]) == 2
    assert "--metadata" in capsys.readouterr().err


def test_doctor_json_runs_without_torch_claims():
    proc = subprocess.run([sys.executable, "-m", "edgederm.cli", "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "onnxruntime-cpu" in report["backends_runnable"]
    assert report["tensorrt"] in ("available", "not installed")


def test_models_table_counts_parameters(capsys):
    pytest.importorskip("torch")
    from edgederm.models import create_model

    assert main(["models", "hifuse_tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["hifuse_tiny"]
    expected = sum(p.numel() for p in create_model("hifuse_tiny").parameters()) / 1e6
    assert rows[0]["params_m"] == pytest.approx(expected, abs=0.01)
    assert rows[0]["gmacs"] > 0 and rows[0]["stages"] == "classifier"


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("torch")
    assert main(["export", "no_such_model", "--out", str(tmp_path / "b")]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
