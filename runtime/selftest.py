"""Golden self-test: stored inputs and reference outputs per stage, run on the device's backend.

TensorRT has no pre-flight check (an engine must run to show it is wrong), and a
graph can be damaged, mis-built or mis-quantized without failing its sha256 (it was
written that way). The self-test runs each stage of the loaded model on golden
inputs and refuses the bundle when an output leaves its tolerance, naming stage,
precision, max difference and tolerance.

Goldens live in the bundle (``selftest/<stage>.npz``, numeric arrays only, read with
``allow_pickle=False``; listed with their sha256 in the manifest's file table, so a
signature covers them) and are described in ``manifest["selftest"]``:

* inputs: a deterministic synthetic lesion (a brown ellipse with a darker core on
  skin tone, seeded) put through the bundle's own preprocessing at each image input's
  size; metadata encoded from an empty record; modality masks all present; inputs
  fed from earlier stages are those stages' fp32 outputs on their goldens.
* reference: the bundle's fp32 graph on ONNX Runtime CPU, for every precision.
* tolerance per stage and precision: ``max(floor * scale, 3 x the difference that
  precision showed against fp32 when the goldens were made)``, where ``scale`` is
  ``max(1, max|reference|)`` and the floors are those in :data:`TOLERANCE_FLOOR`.
  A backend's own rounding (ORT CPU vs CUDA vs TensorRT) stays inside; a graph with
  a scaled weight does not.

``add_goldens`` computes them for an existing bundle (no torch); export and quantize
can call it when they write a bundle.
"""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from .bundle import MANIFEST, read_manifest, sha256_file, write_bytes_atomic, write_json_atomic
from .errors import SelfTestError
from .model import DeployedModel, load

FOLDER = "selftest"
SEED = 20240611
TOLERANCE_FLOOR = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2, "int8_dynamic": 5e-2}
MARGIN = 3.0
IMAGE_SOURCES = ("dermoscopy", "dermoscopy_windows", "clinical")


def synthetic_lesion(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A deterministic dermoscopy-like RGB uint8 image: skin tone, pigmented ellipse, mild noise."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (214, 170, 140)
    center = (width // 2 + int(rng.integers(-width // 8, width // 8 + 1)),
              height // 2 + int(rng.integers(-height // 8, height // 8 + 1)))
    axes = (max(2, width // 4), max(2, height // 5))
    cv2.ellipse(image, center, axes, float(rng.integers(0, 180)), 0, 360, (120, 72, 50), -1)
    cv2.ellipse(image, center, (max(1, axes[0] // 2), max(1, axes[1] // 2)), 0, 0, 360, (70, 40, 30), -1)
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _static_shape(shape: Sequence[Any], batch: int) -> list[int]:
    return [int(d) if isinstance(d, int) else batch for d in shape]


def _golden_inputs(model: DeployedModel, stage: dict[str, Any], fp32_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from . import preprocess as pp

    config = model.preprocess_config
    feed: dict[str, np.ndarray] = {}
    for index, spec in enumerate(stage["inputs"]):
        source = spec.get("source", "dermoscopy")
        # Windows: one image's worth (the grid), so a later stage can regroup them per image.
        batch = int(np.prod(model.tiling.get("grid", (2,)))) if source == "dermoscopy_windows" else 1
        shape = _static_shape(spec["shape"], batch)
        if source in IMAGE_SOURCES:
            height, width = shape[2], shape[3]
            images = [synthetic_lesion(height, width, SEED + 7 * index + b) for b in range(shape[0])]
            sized = dataclasses.replace(config, input_size=(height, width))
            feed[spec["name"]] = np.stack([pp.preprocess(im, sized, pp.image_color_stats(im, sized)) for im in images])
        elif source == "metadata":
            from .metadata import load_schema

            feed[spec["name"]] = load_schema(model.model_info["metadata_schema"]).encode({})[None]
        elif source == "modality_mask":
            feed[spec["name"]] = np.ones(shape, dtype=spec.get("dtype", "float32"))
        else:
            value = fp32_outputs[source]
            feed[spec["name"]] = np.ascontiguousarray(value.reshape(-1, *shape[1:]))
    return {k: v.astype(spec_dtype(stage, k), copy=False) for k, v in feed.items()}


def spec_dtype(stage: dict[str, Any], name: str) -> str:
    return next(str(i.get("dtype", "float32")) for i in stage["inputs"] if i["name"] == name)


def add_goldens(bundle: str | os.PathLike[str], key_provider: Any = None) -> dict[str, dict[str, Any]]:
    """Compute and store goldens for every stage and precision of ``bundle``; returns the manifest section.

    A signature no longer matches afterwards (the manifest and file table change): sign again.
    """
    root = Path(bundle)
    manifest = read_manifest(root, verify=True)
    precisions = manifest.precisions()
    if "fp32" not in precisions:
        raise SelfTestError(f"bundle {root} has no fp32 graph for every stage (has {precisions}); goldens take "
                            "the fp32 graph as reference")
    models = {p: load(root, backend="onnxruntime-cpu", precision=p, cache=False, key_provider=key_provider)
              for p in precisions}
    reference = models["fp32"]
    fp32_outputs: dict[str, np.ndarray] = {}
    section: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for stage in manifest.stages:
        name = stage["name"]
        feed = _golden_inputs(reference, stage, fp32_outputs)
        expected = reference.stages[name].run(feed)
        fp32_outputs.update({f"{name}.{k}": v for k, v in expected.items()})
        tolerances = {}
        for precision, model in models.items():
            got = model.stages[name].run(feed)
            measured = max(float(np.max(np.abs(got[k].astype(np.float64) - v))) for k, v in expected.items())
            scale = max(1.0, max(float(np.max(np.abs(v))) for v in expected.values()))
            tolerances[precision] = max(TOLERANCE_FLOOR.get(precision, 5e-2) * scale, MARGIN * measured)
        arrays[name] = {**{f"input.{k}": v for k, v in feed.items()}, **{f"output.{k}": v for k, v in expected.items()}}
        section[name] = {"file": f"{FOLDER}/{name}.npz", "tolerance": tolerances, "reference": "fp32"}
    data = manifest.data
    for name, entry in section.items():
        buffer = io.BytesIO()
        np.savez(buffer, **arrays[name])  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        write_bytes_atomic(root / entry["file"], buffer.getvalue())
        data["files"][entry["file"]] = {"sha256": sha256_file(root / entry["file"]),
                                        "bytes": (root / entry["file"]).stat().st_size}
    data["selftest"] = {"seed": SEED, "stages": section}
    write_json_atomic(root / MANIFEST, data)
    (root / "model.sig").unlink(missing_ok=True)
    return section


def run_selftest(model: DeployedModel) -> list[dict[str, Any]]:
    """Run the goldens on ``model``'s backend and precision; SelfTestError on the first output out of tolerance."""
    section = (model.manifest.data.get("selftest") or {}).get("stages")
    if not section:
        raise SelfTestError(f"bundle {model.manifest.root} has no golden self-test; "
                            f"add one with `edgederm selftest add {model.manifest.root}` (then sign again)")
    rows = []
    for stage in model.manifest.stages:
        entry = section.get(stage["name"])
        if entry is None:
            raise SelfTestError(f"stage {stage['name']!r} has no goldens; run `edgederm selftest add` again")
        tolerance = (entry.get("tolerance") or {}).get(model.precision)
        if tolerance is None:
            raise SelfTestError(f"stage {stage['name']!r} has no {model.precision} tolerance (goldens made before "
                                f"that precision was added); run `edgederm selftest add {model.manifest.root}` again")
        path = model.manifest.root / entry["file"]
        if entry["file"] not in model.manifest.data["files"]:
            raise SelfTestError(f"goldens {entry['file']!r} are not in the manifest's file table (unverified)")
        with np.load(path, allow_pickle=False) as stored:
            feed = {k[len("input."):]: stored[k] for k in stored.files if k.startswith("input.")}
            expected = {k[len("output."):]: stored[k] for k in stored.files if k.startswith("output.")}
        got = model.stages[stage["name"]].run(feed)
        diff = max(float(np.max(np.abs(got[k].astype(np.float64) - v))) if got[k].shape == v.shape else float("inf")
                   for k, v in expected.items())
        row = {"stage": stage["name"], "precision": model.precision, "backend": model.backend_name,
               "max_abs_diff": diff, "tolerance": float(tolerance), "passed": bool(diff <= tolerance)}
        rows.append(row)
        if not row["passed"]:
            raise SelfTestError(
                f"self-test failed on {model.backend_name}: stage {stage['name']!r} {model.precision} output differs "
                f"from the golden by {diff:.4g} (tolerance {float(tolerance):.4g}); the graph is damaged or mis-built for "
                "this device. Do not use this bundle; re-install the released bundle or rebuild its engines")
    return rows


def selftest_bundle(bundle: str | os.PathLike[str], precisions: Sequence[str] | None = None, backend: str = "auto",
                    trusted_keys: Sequence[Any] | None = None, key_provider: Any = None) -> list[dict[str, Any]]:
    """The self-test of every precision (or those given) of ``bundle`` on ``backend``."""
    rows: list[dict[str, Any]] = []
    for precision in precisions or read_manifest(Path(bundle), verify=False).precisions():
        model = load(bundle, backend=backend, precision=precision, cache=False, trusted_keys=trusted_keys,
                     key_provider=key_provider)
        rows += run_selftest(model)
    return rows
