"""Tamper-evident audit log: chain under threads and processes, rotation, tampering named at its line."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from edgederm.cli import main as cli_main
from edgederm.runtime import load
from edgederm.runtime.audit import AuditLog, image_sha256, log_files, verify_log

IMAGE = np.random.default_rng(5).integers(0, 256, size=(40, 36, 3), dtype=np.uint8)


def _entries(n: int) -> list[dict]:
    return [{"label": "nevus", "probabilities": {"nevus": i / n, "melanoma": 1 - i / n}} for i in range(n)]


@pytest.fixture()
def log20(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", fsync=False)
    for entry in _entries(20):
        log.append(entry)
    return tmp_path / "audit.jsonl"


def test_record_holds_what_identifies_the_prediction_and_only_allowed_metadata(mini_bundle, tmp_path):
    path = tmp_path / "audit.jsonl"
    model = load(mini_bundle, cache=False, audit_log=path, audit_fields=["age"])
    result = model.predict(IMAGE, metadata={"age": 54, "sex": "female", "site": "back"})
    record = json.loads(path.read_text())
    assert record["bundle_id"] == hashlib.sha256((mini_bundle / "manifest.json").read_bytes()).hexdigest()
    assert record["images"] == {"dermoscopy": image_sha256(IMAGE)}
    assert record["label"] == result.label and record["review_reasons"] == result.review_reasons
    assert record["probabilities"] == pytest.approx(result.probabilities, abs=1e-6)
    assert (record["precision"], record["backend"], record["signer"]) == ("fp32", "onnxruntime-cpu", None)
    assert record["metadata"] == {"age": 54}  # sex and site were not allowed
    assert record["latency_ms"] == pytest.approx(result.timings["total"], abs=1e-3)
    assert record["seq"] == 0 and record["prev"] == "0" * 64
    assert "pixels" not in path.read_text() and str(IMAGE[0, 0, 0]) not in record["images"]
    # Another image hashes differently; the pixels are never in the log.
    other = IMAGE.copy()
    other[0, 0, 0] ^= 1
    assert image_sha256(other) != image_sha256(IMAGE)


@pytest.mark.slow
def test_thousand_predictions_from_four_threads_chain(mini_bundle, tmp_path):
    path = tmp_path / "audit.jsonl"
    model = load(mini_bundle, cache=False, audit_log=path)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(250):
                model.predict(IMAGE)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = verify_log(path)
    assert report.ok, report.first_bad
    assert report.records == 1000
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == list(range(1000))


def test_appends_from_several_processes_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        from edgederm.runtime.audit import AuditLog
        log = AuditLog({str(path)!r}, fsync=False)
        for i in range(100):
            log.append({{"label": "p", "i": i}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    report = verify_log(path)
    assert report.ok, report.first_bad
    assert report.records == 300


def _rewrite(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _edit(lines, k):
    lines[k - 1] = lines[k - 1].replace(b'"label":"nevus"', b'"label":"melanoma"')


def _delete(lines, k):
    del lines[k - 1]


def _insert(lines, k):
    lines.insert(k - 1, lines[k - 2])  # a copy of the line before: valid on its own


def _swap(lines, k):
    lines[k - 1], lines[k] = lines[k], lines[k - 1]


@pytest.mark.parametrize("tamper, line, why", [
    (_edit, 1, "edited"), (_edit, 7, "edited"), (_edit, 20, "edited"),
    (_delete, 1, "deleted"), (_delete, 7, "deleted"), (_delete, 19, "deleted"),
    (_insert, 2, "deleted, inserted or moved"), (_insert, 8, "deleted, inserted or moved"),
    (_insert, 21, "deleted, inserted or moved"),
    (_swap, 1, "deleted"), (_swap, 7, "deleted, inserted or moved"), (_swap, 19, "deleted, inserted or moved"),
])
def test_tampering_is_named_at_its_line(log20, tamper, line, why):
    lines = log20.read_bytes().splitlines()
    tamper(lines, line)
    _rewrite(log20, lines)
    report = verify_log(log20)
    assert report.first_bad.startswith(f"{log20}:{line}: ") and why in report.first_bad, report.first_bad


def test_rotation_keeps_one_chain_and_tampering_in_a_rotated_file_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000, fsync=False)
    for entry in _entries(60):
        log.append(entry)
    files = log_files(path)
    assert len(files) >= 3
    report = verify_log(path)
    assert report.ok and report.records == 60
    assert json.loads(path.read_text().splitlines()[0])["seq"] > 0  # the live file continues the chain
    rotated = files[1]
    lines = rotated.read_bytes().splitlines()
    del lines[0]
    _rewrite(rotated, lines)
    assert verify_log(path).first_bad.startswith(f"{rotated}:1: ")


def test_cli_audit_verify(log20, capsys):
    assert cli_main(["audit", "verify", str(log20)]) == 0
    assert "20 records" in capsys.readouterr().out
    lines = log20.read_bytes().splitlines()
    del lines[4]
    _rewrite(log20, lines)
    assert cli_main(["audit", "verify", str(log20)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{log20}:5:" in err
