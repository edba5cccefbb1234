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
    assert set(manifest.verified) == set(manifest.files)  # the hashes of the bytes read, kept for caches
    for name, entry in manifest.files.items():
        assert len(entry.sha256) == 64 and (tiny_bundle / name).stat().st_size == entry.bytes
        assert manifest.verified[name] == entry.sha256


def test_one_changed_byte_is_refused_naming_the_file(bundle_copy):
    graph = bundle_copy / "classifier.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"classifier\.fp32\.onnx.*sha256"):
        load(bundle_copy, precision="fp32")  # the graph that runs (see the test below for the others)


def test_a_graph_is_checked_before_it_runs_not_before_another_precision_does(bundle_copy):
    # load() checks a stage graph when it opens it (a paper-size bundle holds ~0.5 GB of
    # graphs, one precision of which runs); every other file, and `read_manifest`, still
    # check everything.
    int8 = next(name for name in read_manifest(bundle_copy).files if ".int8." in name)
    data = bytearray((bundle_copy / int8).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / int8).write_bytes(bytes(data))
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    model = load(bundle_copy, precision="fp32", cache=False)
    assert model.manifest.deferred and int8 not in model.manifest.verified
    assert model.predict(image).label
    with pytest.raises(BundleIntegrityError, match=rf"{int8.replace('.', '[.]')}.*does not match its manifest sha256"):
        load(bundle_copy, precision="int8", cache=False)
    with pytest.raises(BundleIntegrityError, match="does not match its manifest sha256"):
        read_manifest(bundle_copy)
    (bundle_copy / int8).unlink()
    with pytest.raises(BundleIntegrityError, match="is missing"):
        load(bundle_copy, precision="fp32", cache=False)  # a missing graph is still refused at once


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


@pytest.mark.slow
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


def test_interrupted_quantize_keeps_previous_bundle(bundle_copy, tiny_bundle, synthetic_data, monkeypatch):
    pytest.importorskip("torch")
    from edgederm.calibration import quantize as quantize_mod

    before = (bundle_copy / "manifest.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_mod, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_mod.quantize_bundle(bundle_copy, synthetic_data / "train", max_images=8, say=lambda m: None)
    assert (bundle_copy / "manifest.json").read_text() == before
    image = np.full((64, 64, 3), 120, np.uint8)
    result = load(bundle_copy, precision="fp32").predict(image)
    assert result.probabilities == pytest.approx(load(tiny_bundle, precision="fp32").predict(image).probabilities, abs=1e-6)


def test_export_refuses_existing_folder(tiny_bundle):
    pytest.importorskip("torch")
    from edgederm.export import ExportError, export_bundle
    from edgederm.models import create_model

    with pytest.raises(ExportError, match="already exists.*overwrite"):
        export_bundle(create_model("hifuse_tiny"), tiny_bundle)


# -- typed manifest errors: every malformed value names the field, the value and what is allowed ---------
def _drop(*path):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _set(value, *path):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set([], "stages"), r"field stages: found \[\]; allowed: a non-empty list of stages"),
    (_set("classifier", "stages"), r"field stages: found 'classifier'; allowed: a JSON list"),
    (_set([], "files"), r"field files: found \[\]; allowed: a JSON object"),
    (_drop("stages", 0, "graphs", "fp32", "sha256"), r"graphs\.fp32\.sha256: found None; allowed: the graph's 64-hex"),
    (_drop("stages", 0, "graphs", "fp32", "file"), r"graphs\.fp32\.file: found None; allowed: a non-empty string"),
    (_drop("model", "class_names"), r"model\.class_names: found None; allowed: a non-empty list of class names"),
    (_set("1", "format_version"), r"format_version: found '1'; allowed: an integer >= 1"),
    (_set(2, "format_version"), r"format_version: found 2; allowed: at most 1.*upgrade edgederm"),
    (_set("abc", "clinical", "temperature"), r"clinical\.temperature: found 'abc'; allowed: a finite number > 0"),
    (_set(0, "clinical", "temperature"), r"clinical\.temperature: found 0; allowed: a finite number > 0"),
    (_set(-1.0, "clinical", "temperature"), r"clinical\.temperature: found -1\.0; allowed: a finite number > 0"),
    (_set(float("nan"), "clinical", "temperature"), r"clinical\.temperature: found nan; allowed: a finite number > 0"),
    (_set("high", "clinical", "review_threshold"), r"clinical\.review_threshold: found 'high'; allowed: a probability in \[0, 1\]"),
    (_set(1.5, "clinical", "review_threshold"), r"clinical\.review_threshold: found 1\.5; allowed: a probability in \[0, 1\]"),
    (_set(-0.1, "clinical", "review_threshold"), r"clinical\.review_threshold: found -0\.1"),
    (_set(["nevus", "melanoma"], "model", "class_names"),
     r"model\.class_names: found \['nevus', 'melanoma'\]; allowed: 3 names, one per output of stage 'classifier'"),
    (_set("classify-ish", "model", "task"), r"model\.task: found 'classify-ish'; allowed: one of \['classify', 'segment'\]"),
    (_set([0, 1], "tiling", ), r"field tiling: found \[0, 1\]; allowed: a JSON object or null"),
    (_set({"fixed_bytes": -5, "per_tile_bytes": 1}, "memory"), r"field memory.fixed_bytes: found -5; allowed: an integer >= 1"),
])
def test_malformed_manifest_values_are_typed_errors(bundle_copy, edit, match):
    from edgederm.runtime import ManifestError

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(ManifestError, match=match) as info:
        load(bundle_copy)
    assert isinstance(info.value, BundleError) and "Fix:" in str(info.value)


def test_nul_in_a_file_name_and_deep_json_are_typed_errors(bundle_copy):
    from edgederm.runtime import ManifestError

    _edit_manifest(bundle_copy, _set({"sha256": "0" * 64, "bytes": 1}, "files", "a\x00b.onnx"))
    with pytest.raises(BundleIntegrityError, match="contains a NUL character"):
        load(bundle_copy)
    (bundle_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nested deeper than Python can parse"):
        load(bundle_copy)


def test_a_graph_that_is_not_onnx_but_matches_its_hash_is_a_typed_error(bundle_copy):
    from edgederm.runtime import GraphLoadError
    from edgederm.runtime.bundle import sha256_file

    graph = bundle_copy / "classifier.fp32.onnx"
    graph.write_bytes(b"this is not a protobuf" * 100)
    digest = sha256_file(graph)

    def edit(data):
        data["files"]["classifier.fp32.onnx"]["sha256"] = digest
        data["stages"][0]["graphs"]["fp32"]["sha256"] = digest

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(GraphLoadError, match=r"ONNX Runtime cannot load graph 'classifier\.fp32\.onnx'.*re-export"):
        load(bundle_copy, precision="fp32", cache=False)


def test_writer_refuses_a_manifest_the_reader_would_refuse(bundle_copy):
    from edgederm.runtime import ManifestError
    from edgederm.runtime.bundle import write_manifest

    before = (bundle_copy / "manifest.json").read_text()
    data = json.loads(before)
    data["clinical"]["temperature"] = 0
    with pytest.raises(ManifestError, match="clinical.temperature"):
        write_manifest(bundle_copy, data)
    assert (bundle_copy / "manifest.json").read_text() == before


# -- the optimised-graph cache is keyed by verified bytes, never by a manifest's claim -----------------------
def _impostor(bundle, dest):
    """A copy of ``bundle`` whose fp32 graph is another valid model (logits shifted); the manifest,
    hashes included, is left as it was, so it claims the genuine graph's sha256."""
    import shutil

    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / "classifier.fp32.onnx"))
    logits = model.graph.output[0].name
    for node in model.graph.node:  # logits + [5, -5, 0]: another model with the same inputs and outputs
        node.output[:] = [f"{o}_genuine" if o == logits else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.float32([5, -5, 0]), "impostor_shift"))
    model.graph.node.append(onnx.helper.make_node("Add", [f"{logits}_genuine", "impostor_shift"], [logits]))
    onnx.save(model, str(dest / "classifier.fp32.onnx"))
    return dest


@pytest.mark.parametrize("first", ["genuine", "impostor"])
def test_cache_is_not_shared_by_manifest_claims(tiny_bundle, tmp_path, monkeypatch, first):
    image = np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    impostor = _impostor(tiny_bundle, tmp_path / "impostor")
    genuine_alone = load(tiny_bundle, precision="fp32", cache=False).predict(image).probabilities
    impostor_alone = load(impostor, precision="fp32", cache=False, verify=False).predict(image).probabilities
    assert genuine_alone != pytest.approx(impostor_alone, abs=1e-3)  # two different models
    with pytest.raises(BundleIntegrityError, match="does not match its manifest sha256"):
        load(impostor, precision="fp32")  # the claim is checked when the graph is opened
    monkeypatch.setenv("EDGEDERM_CACHE", str(tmp_path / "shared-cache"))
    runs = {"genuine": lambda: load(tiny_bundle, precision="fp32"),
            "impostor": lambda: load(impostor, precision="fp32", verify=False)}
    second = "impostor" if first == "genuine" else "genuine"
    a, b = runs[first](), runs[second]()
    assert a.cache_hits == {"classifier": False} and b.cache_hits == {"classifier": False}
    expected = {"genuine": genuine_alone, "impostor": impostor_alone}
    assert a.predict(image).probabilities == pytest.approx(expected[first], abs=1e-6)
    assert b.predict(image).probabilities == pytest.approx(expected[second], abs=1e-6)
    assert runs[first]().cache_hits == {"classifier": True}  # each answers from its own entry
    assert len(list((tmp_path / "shared-cache").glob("*.onnx"))) == 2
