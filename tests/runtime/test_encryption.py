"""Encrypted graphs: same outputs as plain, plaintext never on disk, wrong key refused before any graph loads."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edgederm.cli import main as cli_main  # noqa: E402
from edgederm.runtime import load  # noqa: E402
from edgederm.runtime.bundle import read_manifest, sha256_file, write_manifest  # noqa: E402
from edgederm.runtime.crypto import encrypt_bundle, graph_key_id, new_key_file, resolve_key  # noqa: E402
from edgederm.runtime.errors import BundleIntegrityError, DecryptionError, InputError  # noqa: E402

IMAGES = [np.random.default_rng(s).integers(0, 256, size=(40 + s, 52, 3), dtype=np.uint8) for s in range(4)]


@pytest.fixture()
def plain_and_encrypted(mini_bundle, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(mini_bundle, plain)
    key = new_key_file(tmp_path / "graph.key")
    encrypt_bundle(mini_bundle, key)
    return plain, mini_bundle, key


def _chunks(graph: bytes) -> list[bytes]:
    """Distinctive pieces of the plaintext graph: its head and its weight bytes."""
    return [graph[:64], graph[len(graph) // 2: len(graph) // 2 + 64], graph[-64:]]


def _files_holding(folders, chunks) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else []:
            if path.is_file():
                data = path.read_bytes()
                if any(c in data for c in chunks):
                    found.append(str(path))
    return found


def test_encrypted_bundle_predicts_exactly_as_the_plain_one(plain_and_encrypted):
    plain, encrypted, key = plain_and_encrypted
    assert not (encrypted / "classifier.fp32.onnx").exists()
    manifest = json.loads((encrypted / "manifest.json").read_text())
    assert manifest["stages"][0]["graphs"]["fp32"]["file"] == "classifier.fp32.onnx.enc"
    assert manifest["encryption"]["key_id"] == graph_key_id(resolve_key(key))
    a, b = load(plain, cache=False), load(encrypted, key_provider=key)
    for image in IMAGES:
        p, q = a.predict(image).probabilities, b.predict(image).probabilities
        assert max(abs(p[k] - q[k]) for k in p) == 0.0


def test_plaintext_never_on_disk_during_or_after_prediction(plain_and_encrypted, tmp_path, monkeypatch):
    plain, encrypted, key = plain_and_encrypted
    chunks = _chunks((plain / "classifier.fp32.onnx").read_bytes())
    temp, cache = tmp_path / "tmp", tmp_path / "cache"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("EDGEDERM_CACHE", str(cache))  # the optimised-graph cache is on for plain bundles
    folders = [encrypted, temp, cache]
    assert _files_holding(folders, chunks) == []
    scans = []

    import onnxruntime

    real_session = onnxruntime.InferenceSession

    def watched_session(*args, **kwargs):
        session = real_session(*args, **kwargs)
        scans.append(_files_holding(folders, chunks))  # the plaintext is in memory now
        return session

    monkeypatch.setattr(onnxruntime, "InferenceSession", watched_session)
    model = load(encrypted, key_provider=key)  # cache=True: must be skipped for encrypted graphs
    stage = model.stages["classifier"]
    real_run = stage._run

    def watched_run(feed):
        scans.append(_files_holding(folders, chunks))
        return real_run(feed)

    monkeypatch.setattr(stage, "_run", watched_run)
    model.predict(IMAGES[0])
    scans.append(_files_holding(folders, chunks))
    assert len(scans) >= 3 and all(found == [] for found in scans), scans
    assert not cache.exists() or not any(cache.iterdir())
    # The same watch does see a plain bundle's graph (the scan can fail).
    assert _files_holding([plain], chunks) == [str(plain / "classifier.fp32.onnx")]


def test_key_providers_and_wrong_keys(plain_and_encrypted, tmp_path, monkeypatch):
    _, encrypted, key = plain_and_encrypted
    secret = resolve_key(key)
    monkeypatch.setenv("EDGEDERM_GRAPH_KEY", secret.hex())
    for provider in (secret, lambda: secret, "env:EDGEDERM_GRAPH_KEY", str(key)):
        assert load(encrypted, key_provider=provider, cache=False).predict(IMAGES[1]).label is not None
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("a graph was handed to ONNX Runtime with a wrong key")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    wrong = bytes(32)
    with pytest.raises(DecryptionError, match=rf"wrong key .* encrypted with key {graph_key_id(secret)}, the key "
                                              rf"provider gave key {graph_key_id(wrong)}"):
        load(encrypted, key_provider=wrong)
    with pytest.raises(DecryptionError, match="no key provider was given"):
        load(encrypted)
    with pytest.raises(DecryptionError, match="gave 16 bytes; expected a 32-byte"):
        load(encrypted, key_provider=lambda: bytes(16))


def test_encryption_section_is_typed_and_checked_by_the_reader(plain_and_encrypted):
    _, encrypted, key = plain_and_encrypted
    section = read_manifest(encrypted).encryption
    assert section is not None and section.key_id == graph_key_id(resolve_key(key))
    assert section.files["classifier.fp32.onnx.enc"].plaintext_file == "classifier.fp32.onnx"
    with pytest.raises(InputError, match="already encrypted"):
        encrypt_bundle(encrypted, key)
    before = (encrypted / "manifest.json").read_bytes()
    data = json.loads(before)
    del data["encryption"]["files"]["classifier.fp32.onnx.enc"]
    with pytest.raises(BundleIntegrityError, match="'classifier.fp32.onnx.enc' has no encryption record"):
        write_manifest(encrypted, data)  # the one writer checks before it replaces anything
    assert (encrypted / "manifest.json").read_bytes() == before
    (encrypted / "manifest.json").write_text(json.dumps(data))  # written by something else
    with pytest.raises(BundleIntegrityError, match="has no encryption record"):
        load(encrypted, key_provider=key)


def test_changed_ciphertext_fails_authentication(plain_and_encrypted):
    _, encrypted, key = plain_and_encrypted
    path = encrypted / "classifier.fp32.onnx.enc"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    manifest = json.loads((encrypted / "manifest.json").read_text())  # hash updated: only GCM can tell
    manifest["files"]["classifier.fp32.onnx.enc"]["sha256"] = manifest["stages"][0]["graphs"]["fp32"]["sha256"] = \
        sha256_file(path)
    (encrypted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DecryptionError, match="does not decrypt"):
        load(encrypted, key_provider=key)


def test_cli_encrypt_sign_and_predict(mini_bundle, tmp_path, capsys):
    pytest.importorskip("model_signing")
    import cv2

    assert cli_main(["keygen", "--out", str(tmp_path / "k"), "--graph-key"]) == 0
    keys = tmp_path / "k"
    assert cli_main(["encrypt", str(mini_bundle), "--key-file", str(keys / "graph.key")]) == 0
    assert cli_main(["sign", str(mini_bundle), "--key", str(keys / "signing-key.pem")]) == 0
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), IMAGES[2])
    capsys.readouterr()
    common = ["predict", str(mini_bundle), str(image), "--trusted-key", str(keys / "signing-key.pub")]
    assert cli_main(common + ["--key-file", str(keys / "graph.key"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"]
    other = new_key_file(tmp_path / "other.key")
    assert cli_main(common + ["--key-file", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong key" in err
    assert os.stat(keys / "graph.key").st_mode & 0o077 == 0
