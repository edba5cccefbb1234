"""Measure a bundle's memory at export: process peak = fixed + per-tile slope x batch.

The runtime's memory planner (``runtime/memory.py``) turns a budget into a tile
batch with this line, so it is measured, not guessed (``docs/architecture.md``,
tiling and memory). Every bundle gets one: the profiled stage is the tiled one (a
segmenter, or the window encoder of a windowed model), else the stage fed the whole
dermoscopy image, so a classifier's budget is planned (and refused) the same way. How:

* Each measurement is a fresh Python process (the peak RSS, ``VmHWM``, is a
  high-water mark of the whole process, so one process per point; not
  ``ru_maxrss``, which Linux carries over from the exporting parent through
  fork + exec), which imports what the device
  imports (``edgederm.runtime``: numpy, OpenCV, ONNX Runtime; no torch), opens
  every stage's fp32 graph with the runtime's session options (shared CPU arena
  growing by what is requested, memory pattern on, the runtime's thread count),
  runs every other stage once at batch 1, then runs the profiled stage on a batch
  of ``b`` random uint8 images of its input size through the runtime's own per-tile
  path: ``preprocess_batch``, the graph, the probabilities (its other inputs zeros).
  Twice, so arena growth after the first run is seen.
* Two batches (default 1 and 8) give the line: ``per_tile = (peak_8 - peak_1) / 7``,
  ``fixed = peak_1 - per_tile``. A slope below the bytes a tile provably needs
  (its uint8 pixels, float input and float output twice) is measurement noise
  (the arena had room to spare) and is raised to that floor, which is recorded.
* It runs on this machine's ONNX Runtime CPU provider; ``measured_on`` says so. A
  device with another backend (CUDA EP, TensorRT) has other figures: measure there
  with :func:`measure_memory_profile` on the bundle folder, or keep a margin.
  INT8 graphs added later by ``edgederm quantize`` are smaller; the fp32 figures
  stay a safe upper bound for them.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, Callable

from edgederm.runtime.bundle import Manifest, TensorSpec
from edgederm.runtime.errors import EdgeDermError

__all__ = ["measure_memory_profile", "MemoryProfileError"]


class MemoryProfileError(EdgeDermError):
    """The memory measurement subprocess failed."""


_WORKER = r"""
import dataclasses, json, sys
from pathlib import Path
import numpy as np
args = json.loads(sys.argv[1])
from edgederm.runtime import preprocess as pp
from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgederm.runtime.bundle import parse_manifest
from edgederm.runtime.probabilities import tile_probabilities
from edgederm.runtime.rss import peak_rss_bytes

bundle = parse_manifest(args["manifest"], Path(args["root"]))
profiled = bundle.profiled_stage
image_spec = next(s for s in profiled.inputs if s.name == args["image_input"])
rng = np.random.default_rng(0)

def zeros(spec, batch):
    return np.zeros([batch, *[d if isinstance(d, int) else 1 for d in spec.shape[1:]]], dtype=spec.dtype)

backends = {}
for stage in bundle.stages:
    backends[stage.name] = OnnxRuntimeBackend(bundle.graph_path(stage, "fp32"), ["CPUExecutionProvider"],
                                              args["threads"], arena="same_as_requested")
    if stage.name != profiled.name:
        backends[stage.name].run({spec.name: zeros(spec, 1) for spec in stage.inputs})
height, width = int(image_spec.shape[2]), int(image_spec.shape[3])
config = dataclasses.replace(bundle.preprocess, input_size=(height, width), resize="none", crop_fraction=1.0)
images = rng.integers(0, 256, size=(args["batch"], height, width, 3), dtype=np.uint8)
stats = pp.color_stats(images[0])
for _ in range(2):
    feed = {spec.name: zeros(spec, args["batch"]) for spec in profiled.inputs if spec.name != image_spec.name}
    feed[image_spec.name] = pp.preprocess_batch(images, config, stats)
    out = backends[profiled.name].run(feed)
    if bundle.model.task == "segment":
        tile_probabilities(next(iter(out.values())))
print(json.dumps({"peak_bytes": peak_rss_bytes()}))
"""


def _image_input(bundle: Manifest) -> TensorSpec:
    """The profiled stage's image input (its batch is what the plan sizes)."""
    stage = bundle.profiled_stage
    for spec in stage.inputs:
        if spec.source in ("dermoscopy", "dermoscopy_windows", "clinical") and spec.static(1):
            return spec
    raise MemoryProfileError(f"stage {stage.name!r} has no image input of fixed size to measure "
                             f"(inputs: {[(s.name, s.source, list(s.shape)) for s in stage.inputs]})")


def _measure(args: dict[str, Any], timeout: float) -> int:
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise MemoryProfileError(
            f"memory measurement at batch {args['batch']} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}"
        )
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def measure_memory_profile(
    bundle: Manifest,
    *,
    batches: tuple[int, int] = (1, 8),
    threads: int | None = None,
    timeout: float = 300.0,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit ``fixed + per_tile x batch`` to two measured process peaks; the manifest's "memory".

    ``bundle``: the parsed manifest of the bundle folder (its files need not be hashed
    yet: export measures before it writes the manifest).
    """
    import onnxruntime

    low, high = sorted(batches)
    if low < 1 or high <= low:
        raise ValueError(f"batches must be two increasing positive ints, got {batches}")
    threads = threads or min(2, os.cpu_count() or 1)
    stage, image = bundle.profiled_stage, _image_input(bundle)
    base = {"manifest": dict(bundle.data), "root": str(bundle.root), "threads": threads, "image_input": image.name}
    peaks = []
    for batch in (low, high):
        if say:
            say(f"  measuring memory: stage {stage.name}, batch {batch} (subprocess)")
        peaks.append(_measure({**base, "batch": batch}, timeout))
    pixels = int(image.shape[2]) * int(image.shape[3])
    out_elems = 1
    for d in stage.outputs[0].shape[1:]:
        out_elems *= int(d) if isinstance(d, int) else 1
    floor = pixels * 3 + pixels * 3 * 4 + 2 * out_elems * 4
    measured = (peaks[1] - peaks[0]) / (high - low)
    slope = int(max(measured, floor))
    fixed = int(peaks[0] - slope * low)
    return {
        "fixed_bytes": fixed,
        "per_tile_bytes": slope,
        "stage": stage.name,
        "measured_on": {
            "backend": "onnxruntime-cpu", "onnxruntime": onnxruntime.__version__, "precision": "fp32",
            "machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "threads": threads, "batches": [low, high], "peak_bytes": peaks,
            "measured_slope_bytes": int(measured), "slope_floor_bytes": int(floor),
            "slope_floored": measured < floor,
        },
    }
