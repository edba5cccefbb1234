"""Signed bundles: OpenSSF model-signing format, key based; every refusal typed and before any graph is parsed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edgederm.cli import main as cli_main  # noqa: E402
from edgederm.runtime import load  # noqa: E402
from edgederm.runtime.bundle import sha256_file  # noqa: E402
from edgederm.runtime.errors import (  # noqa: E402
    SignedFileChangedError,
    SignedFileMissingError,
    UnsignedBundleError,
    UnsignedFileError,
    UntrustedSignerError,
)
from edgederm.runtime.signing import SIGNATURE_FILE, key_id, keygen, load_public_key, sign_bundle, verify_bundle  # noqa: E402

IMAGE = np.random.default_rng(3).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)


@pytest.fixture()
def keys(tmp_path):
    return keygen(tmp_path / "keys")


@pytest.fixture()
def other_keys(tmp_path):
    return keygen(tmp_path / "other")


@pytest.fixture()
def signed(mini_bundle, keys):
    pytest.importorskip("model_signing")
    sign_bundle(mini_bundle, keys[0])
    return mini_bundle


@pytest.fixture()
def no_graph_parsing(monkeypatch):
    """Fails the test if ONNX Runtime is asked to open any graph."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("a graph was parsed before the signature check refused the bundle")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def test_signed_bundle_loads_with_its_key_and_predicts_the_same(signed, keys):
    pinned = load(signed, trusted_keys=[keys[1]], cache=False)
    plain = load(signed, cache=False)
    assert pinned.signature.key_id == key_id(load_public_key(keys[1]))
    a, b = pinned.predict(IMAGE), plain.predict(IMAGE)
    assert a.probabilities == b.probabilities
    # Every file of the bundle is covered, the manifest included.
    assert set(pinned.signature.files) == {"manifest.json", "classifier.fp32.onnx"}


def test_unsigned_bundle_is_refused(mini_bundle, keys, no_graph_parsing):
    with pytest.raises(UnsignedBundleError, match=r"is not signed \(no model.sig\).*edgederm sign"):
        load(mini_bundle, trusted_keys=[keys[1]])


def test_other_key_is_refused_naming_both_keys(signed, keys, other_keys, no_graph_parsing):
    signer = key_id(load_public_key(keys[1]))[:16]
    pinned = key_id(load_public_key(other_keys[1]))[:16]
    with pytest.raises(UntrustedSignerError, match=rf"signed by key {signer}.*pinned: {pinned}"):
        load(signed, trusted_keys=[other_keys[1]])
    # A second pinned key that did sign is accepted.
    assert verify_bundle(signed, [other_keys[1], keys[1]]).key_id.startswith(signer)


@pytest.mark.parametrize("name", ["manifest.json", "classifier.fp32.onnx"])
def test_one_flipped_byte_in_any_file_is_refused_naming_it(signed, keys, name, no_graph_parsing):
    path = signed / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SignedFileChangedError, match=rf"'{name}' changed after signing"):
        load(signed, trusted_keys=[keys[1]])


@pytest.mark.parametrize("name", ["extra.onnx", "sub/notes.txt", ".gitignore"])
def test_added_file_is_refused_naming_it(signed, keys, name, no_graph_parsing):
    (signed / name).parent.mkdir(exist_ok=True)
    (signed / name).write_text("x")
    with pytest.raises(UnsignedFileError, match=rf"'{name}' not covered by the signature"):
        load(signed, trusted_keys=[keys[1]])


def test_removed_file_is_refused_naming_it(signed, keys, no_graph_parsing):
    (signed / "classifier.fp32.onnx").unlink()
    with pytest.raises(SignedFileMissingError, match=r"'classifier.fp32.onnx' missing"):
        load(signed, trusted_keys=[keys[1]])


def test_swapped_graph_with_updated_hash_is_refused(signed, keys, no_graph_parsing):
    """The attack the manifest's own sha256s cannot stop: replace the graph and fix its hash."""
    graph = signed / "classifier.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[-5] ^= 0x40
    graph.write_bytes(bytes(data))
    manifest = json.loads((signed / "manifest.json").read_text())
    digest = sha256_file(graph)
    manifest["files"]["classifier.fp32.onnx"]["sha256"] = digest
    manifest["stages"][0]["graphs"]["fp32"]["sha256"] = digest
    (signed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SignedFileChangedError, match=r"'classifier.fp32.onnx', 'manifest.json' changed"):
        load(signed, trusted_keys=[keys[1]])


def test_link_in_bundle_is_refused(signed, keys, tmp_path):
    (tmp_path / "outside").write_text("x")
    (signed / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsignedFileError, match=r"holds a link 'link'"):
        verify_bundle(signed, [keys[1]])


# -- interop with the model-signing project's own signer and verifier -----------------------------
def test_edgederm_signature_verifies_with_model_signing(signed, keys):
    ms = pytest.importorskip("model_signing")
    ms.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(signed, signed / SIGNATURE_FILE)
    (signed / "classifier.fp32.onnx").write_bytes(b"swapped")
    with pytest.raises(ValueError, match=r"Hash mismatch for .*classifier.fp32.onnx"):
        ms.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(signed, signed / SIGNATURE_FILE)


def test_model_signing_api_signature_verifies_here(mini_bundle, keys, tmp_path):
    ms = pytest.importorskip("model_signing")
    ms.signing.Config().use_elliptic_key_signer(private_key=keys[0]).sign(mini_bundle, tmp_path / "model.sig")
    shutil.copy(tmp_path / "model.sig", mini_bundle / SIGNATURE_FILE)
    info = verify_bundle(mini_bundle, [keys[1]])
    assert info.files["classifier.fp32.onnx"] == sha256_file(mini_bundle / "classifier.fp32.onnx")
    (mini_bundle / "manifest.json").write_text("{}")
    with pytest.raises(SignedFileChangedError, match="'manifest.json'"):
        verify_bundle(mini_bundle, [keys[1]])


def test_model_signing_cli_interop_both_ways(mini_bundle, keys, tmp_path):
    pytest.importorskip("model_signing")
    cli = [sys.executable, "-m", "model_signing"]
    copy = tmp_path / "copy"
    shutil.copytree(mini_bundle, copy)
    # Their CLI signs, we verify.
    subprocess.run(cli + ["sign", "key", str(mini_bundle), "--private_key", str(keys[0]),
                          "--signature", str(tmp_path / "cli.sig")], check=True, capture_output=True)
    shutil.copy(tmp_path / "cli.sig", mini_bundle / SIGNATURE_FILE)
    verify_bundle(mini_bundle, [keys[1]])
    # We sign, their CLI verifies (and refuses a changed file).
    sign_bundle(copy, keys[0])
    ok = subprocess.run(cli + ["verify", "key", str(copy), "--signature", str(copy / SIGNATURE_FILE),
                               "--public_key", str(keys[1])], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (copy / "manifest.json").write_text("{}")
    bad = subprocess.run(cli + ["verify", "key", str(copy), "--signature", str(copy / SIGNATURE_FILE),
                                "--public_key", str(keys[1])], capture_output=True, text=True)
    assert bad.returncode != 0


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_keygen_sign_verify_and_one_line_refusals(mini_bundle, tmp_path, capsys):
    pytest.importorskip("model_signing")
    assert cli_main(["keygen", "--out", str(tmp_path / "k")]) == 0
    pub, private = tmp_path / "k" / "signing-key.pub", tmp_path / "k" / "signing-key.pem"
    assert private.stat().st_mode & 0o077 == 0
    image = tmp_path / "lesion.png"
    import cv2

    cv2.imwrite(str(image), IMAGE)
    capsys.readouterr()
    assert cli_main(["predict", str(mini_bundle), str(image), "--trusted-key", str(pub)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not signed" in err
    assert cli_main(["sign", str(mini_bundle), "--key", str(private)]) == 0
    assert cli_main(["verify", str(mini_bundle), "--trusted-key", str(pub)]) == 0
    assert cli_main(["predict", str(mini_bundle), str(image), "--trusted-key", str(pub), "--json"]) == 0
    (mini_bundle / "extra").write_text("x")
    capsys.readouterr()
    assert cli_main(["verify", str(mini_bundle), "--trusted-key", str(pub)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'extra' not covered" in err


def test_trust_modules_import_without_their_packages_and_say_what_to_install(mini_bundle, tmp_path):
    """A device without cryptography/model-signing imports every trust module, predicts, and gets install hints."""
    script = textwrap.dedent(f"""
        import builtins, sys
        real_import = builtins.__import__
        blocked = ("cryptography", "model_signing", "torch", "onnx")
        def guarded(name, *args, **kwargs):
            if name.split(".")[0] in blocked:
                raise ImportError(name + " is blocked in this test")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = guarded
        from edgederm.runtime import audit, crypto, load, selftest, signing, store, trust
        from edgederm.runtime.errors import MissingDependencyError
        model = load({str(mini_bundle)!r}, cache=False, audit_log={str(tmp_path / 'a.jsonl')!r})
        assert model.predict(__import__("numpy").zeros((32, 32, 3), "uint8")).label
        for call, hint in ((lambda: load({str(mini_bundle)!r}, trusted_keys=[b"x"]), "edgederm[trust]"),
                           (lambda: signing.sign_bundle({str(mini_bundle)!r}, "k.pem"), "edgederm[sign]")):
            try:
                call()
            except MissingDependencyError as exc:
                assert hint in str(exc), exc
            else:
                raise AssertionError("no MissingDependencyError")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
