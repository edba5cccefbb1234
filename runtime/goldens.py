"""Making a bundle's golden self-test, and running it for every precision.

The goldens and the check itself are described in runtime/selftest.py; this module
loads bundles (``load``), so it sits above runtime/model.py, while the check that
``load(..., selftest=True)`` runs does not.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import preprocess as pp
from .bundle import IMAGE_SOURCES, Stage, read_manifest, sha256_file, write_bytes_atomic, write_manifest
from .errors import SelfTestError
from .model import DeployedModel, load
from .selftest import FOLDER, MARGIN, SEED, TOLERANCE_FLOOR, run_selftest, synthetic_lesion


def _golden_inputs(model: DeployedModel, stage: Stage, fp32_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    config = model.preprocess_config
    grid = model.manifest.tiling.grid
    feed: dict[str, np.ndarray] = {}
    for index, spec in enumerate(stage.inputs):
        # Windows: one image's worth (the grid), so a later stage can regroup them per image.
        batch = int(np.prod(grid)) if spec.source == "dermoscopy_windows" and grid is not None else 1
        shape = [int(d) if isinstance(d, int) else batch for d in spec.shape]
        if spec.source in IMAGE_SOURCES:
            height, width = shape[2], shape[3]
            images = [synthetic_lesion(height, width, SEED + 7 * index + b) for b in range(shape[0])]
            sized = dataclasses.replace(config, input_size=(height, width))
            value = np.stack([pp.preprocess(im, sized, pp.image_color_stats(im, sized)) for im in images])
        elif spec.source == "metadata":
            from .metadata import load_schema

            value = load_schema(model.manifest.model.metadata_schema).encode({})[None]
        elif spec.source == "modality_mask":
            value = np.ones(shape)
        else:
            value = np.ascontiguousarray(fp32_outputs[spec.source].reshape(-1, *shape[1:]))
        feed[spec.name] = value.astype(spec.dtype, copy=False)
    return feed


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
        feed = _golden_inputs(reference, stage, fp32_outputs)
        expected = reference.stages[stage.name].run(feed)
        fp32_outputs.update({f"{stage.name}.{k}": v for k, v in expected.items()})
        tolerances = {}
        for precision, model in models.items():
            got = model.stages[stage.name].run(feed)
            measured = max(float(np.max(np.abs(got[k].astype(np.float64) - v))) for k, v in expected.items())
            scale = max(1.0, max(float(np.max(np.abs(v))) for v in expected.values()))
            tolerances[precision] = max(TOLERANCE_FLOOR.get(precision, 5e-2) * scale, MARGIN * measured)
        arrays[stage.name] = {**{f"input.{k}": v for k, v in feed.items()},
                              **{f"output.{k}": v for k, v in expected.items()}}
        section[stage.name] = {"file": f"{FOLDER}/{stage.name}.npz", "tolerance": tolerances, "reference": "fp32"}
    data: dict[str, Any] = copy.deepcopy(dict(manifest.data))
    for name, entry in section.items():
        buffer = io.BytesIO()
        np.savez(buffer, **arrays[name])  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        write_bytes_atomic(root / entry["file"], buffer.getvalue())
        data["files"][entry["file"]] = {"sha256": sha256_file(root / entry["file"]),
                                        "bytes": (root / entry["file"]).stat().st_size}
    data["selftest"] = {"seed": SEED, "stages": section}
    write_manifest(root, data)
    (root / "model.sig").unlink(missing_ok=True)
    return section


def selftest_bundle(bundle: str | os.PathLike[str], precisions: Sequence[str] | None = None, backend: str = "auto",
                    trusted_keys: Sequence[Any] | None = None, key_provider: Any = None) -> list[dict[str, Any]]:
    """The self-test of every precision (or those given) of ``bundle`` on ``backend``."""
    rows: list[dict[str, Any]] = []
    for precision in precisions or read_manifest(Path(bundle), verify=False).precisions():
        model = load(bundle, backend=backend, precision=precision, cache=False, trusted_keys=trusted_keys,
                     key_provider=key_provider)
        rows += run_selftest(model)
    return rows
