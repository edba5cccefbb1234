"""Bundle integrity: hashes, paths that leave the bundle, interrupted writers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgederm.runtime import BundleError, BundleIntegrityError, load
from edgederm.runtime.bundle import read_manifest


def _edit_manifest(bundle, edit):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_bundle_loads_and_lists_hashes(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert manifest.precisions() == ["fp32", "int8"]
    for name, entry in manifest.data["files"].items():
        assert len(entry["sha256"]) == 64 and (tiny_bundle / name).stat().st_size == entry["bytes"]


def test_one_changed_byte_is_refused_naming_the_file(bundle_copy):
    graph = bundle_copy / "classifier.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"classifier\.fp32\.onnx.*sha256"):
        load(bundle_copy)


@pytest.mark.parametrize("bad", ["../x.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_manifest_path_outside_bundle_is_refused(bundle_copy, bad):
    def edit(data):
        data["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
        data["stages"][0]["graphs"]["fp32"]["file"] = bad

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleIntegrityError, match="outside the bundle|absolute path"):
        load(bundle_copy)


def test_symlink_leaving_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle_copy / "classifier.fp32.onnx").read_bytes())
    (bundle_copy / "classifier.fp32.onnx").unlink()
    os.symlink(outside, bundle_copy / "classifier.fp32.onnx")
    with pytest.raises(BundleIntegrityError, match="outside the bundle"):
        load(bundle_copy)


def test_missing_manifest_and_bad_json(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load(tmp_path)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load(bundle_copy)


def test_unknown_precision_names_the_fix(tiny_bundle):
    with pytest.raises(BundleError, match="fp16.*edgederm quantize"):
        load(tiny_bundle, precision="fp16")


def test_interrupted_export_leaves_nothing_that_loads(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from edgederm.export import bundle as bundle_mod
    from edgederm.models import create_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the parity check

    monkeypatch.setattr(bundle_mod, "check_parity", interrupted)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        bundle_mod.export_bundle(create_model("hifuse_tiny"), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*")), "staging folder must be cleaned up"
    with pytest.raises(BundleError):
        load(tmp_path / "b")


def test_interrupted_quantize_keeps_previous_bundle(bundle_copy, synthetic_data, monkeypatch):
    pytest.importorskip("torch")
    from edgederm.calibration import quantize as quantize_mod

    before = (bundle_copy / "manifest.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_mod, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_mod.quantize_bundle(bundle_copy, synthetic_data / "train", max_images=8, say=lambda m: None)
    assert (bundle_copy / "manifest.json").read_text() == before
    model = load(bundle_copy, precision="fp32")
    assert model.predict(np.full((64, 64, 3), 120, np.uint8)).label is not None


def test_export_refuses_existing_folder(tiny_bundle):
    pytest.importorskip("torch")
    from edgederm.export import ExportError, export_bundle
    from edgederm.models import create_model

    with pytest.raises(ExportError, match="already exists.*overwrite"):
        export_bundle(create_model("hifuse_tiny"), tiny_bundle)
