"""Measure a bundle's memory at export: process peak = fixed + per-tile slope x batch.

The runtime's memory planner (``runtime/memory.py``) turns a budget into a tile
batch with this line, so it is measured, not guessed (ARCHITECTURE.md, tiling and
memory). How:

* Each measurement is a fresh Python process (the peak RSS, ``VmHWM``, is a
  high-water mark of the whole process, so one process per point; not
  ``ru_maxrss``, which Linux carries over from the exporting parent through
  fork + exec), which imports what the device
  imports (``edgederm.runtime``: numpy, OpenCV, ONNX Runtime; no torch), opens
  every stage's fp32 graph with the runtime's session options (shared CPU arena
  growing by what is requested, memory pattern on, the runtime's thread count),
  runs every other stage once at batch 1, then runs the *tiled* stage (the
  segmenter, or the window encoder of a windowed model) on a batch of ``b``
  random uint8 tiles through the runtime's own per-tile path: ``preprocess_batch``,
  the graph, the probabilities. Twice, so arena growth after the first run is seen.
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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgederm.runtime.errors import EdgeDermError

__all__ = ["measure_memory_profile", "tiled_stage_name", "MemoryProfileError"]


class MemoryProfileError(EdgeDermError):
    """The memory measurement subprocess failed."""


_WORKER = r"""
import json, sys
import numpy as np
args = json.loads(sys.argv[1])
from edgederm.runtime import preprocess as pp
from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgederm.runtime.model import tile_probabilities

config = pp.PreprocessConfig.from_dict(args["preprocess"])
rng = np.random.default_rng(0)
tiled = None
for stage in args["stages"]:
    backend = OnnxRuntimeBackend(stage["graph"], ["CPUExecutionProvider"], args["threads"], arena="same_as_requested")
    if stage["name"] == args["tiled"]:
        tiled = (stage, backend)
        continue
    feed = {}
    for spec in stage["inputs"]:
        shape = [1 if not isinstance(d, int) else d for d in spec["shape"]]
        feed[spec["name"]] = np.zeros(shape, dtype=spec["dtype"])
    backend.run(feed)
stage, backend = tiled
spec = stage["inputs"][0]
side = int(spec["shape"][2])
import dataclasses
config = dataclasses.replace(config, input_size=(side, side), resize="none")
tiles = rng.integers(0, 256, size=(args["batch"], side, side, 3), dtype=np.uint8)
stats = pp.color_stats(tiles[0])
for _ in range(2):
    x = pp.preprocess_batch(tiles, config, stats)
    out = backend.run({spec["name"]: x})
    if args["segment"]:
        tile_probabilities(next(iter(out.values())))
from edgederm.runtime.model import peak_rss_bytes
print(json.dumps({"peak_bytes": peak_rss_bytes()}))
"""


def tiled_stage_name(stages: Sequence[Mapping[str, Any]], task: str) -> str | None:
    """The stage run over many tiles: the segmenter, or the one fed dermoscopy windows."""
    for stage in stages:
        sources = [i.get("source") for i in stage["inputs"]]
        if "dermoscopy_windows" in sources or (task == "segment" and "dermoscopy" in sources):
            return str(stage["name"])
    return None


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
    root: str | os.PathLike[str],
    stages: Sequence[Mapping[str, Any]],
    preprocess: Mapping[str, Any],
    task: str,
    *,
    batches: tuple[int, int] = (1, 8),
    threads: int | None = None,
    timeout: float = 300.0,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Fit ``fixed + per_tile x batch`` to two measured process peaks; the manifest's "memory".

    ``stages`` are manifest stage entries (graphs relative to ``root``). Returns None
    when the model has no tiled stage (nothing for a batch to size).
    """
    import onnxruntime

    tiled = tiled_stage_name(stages, task)
    if tiled is None:
        return None
    low, high = sorted(batches)
    if low < 1 or high <= low:
        raise ValueError(f"batches must be two increasing positive ints, got {batches}")
    threads = threads or min(2, os.cpu_count() or 1)
    stage_args = [{"name": s["name"], "graph": str(Path(root) / s["graphs"]["fp32"]["file"]),
                   "inputs": s["inputs"]} for s in stages]
    base = {"stages": stage_args, "tiled": tiled, "preprocess": dict(preprocess), "threads": threads,
            "segment": task == "segment"}
    peaks = []
    for batch in (low, high):
        if say:
            say(f"  measuring memory: stage {tiled}, batch {batch} (subprocess)")
        peaks.append(_measure({**base, "batch": batch}, timeout))
    tiled_stage = next(s for s in stages if s["name"] == tiled)
    spec = tiled_stage["inputs"][0]
    side = int(spec["shape"][2])
    out_shape = tiled_stage["outputs"][0]["shape"]
    out_elems = 1
    for d in out_shape[1:]:
        out_elems *= int(d) if isinstance(d, int) else 1
    floor = side * side * 3 + side * side * 3 * 4 + 2 * out_elems * 4
    measured = (peaks[1] - peaks[0]) / (high - low)
    slope = int(max(measured, floor))
    fixed = int(peaks[0] - slope * low)
    return {
        "fixed_bytes": fixed,
        "per_tile_bytes": slope,
        "stage": tiled,
        "measured_on": {
            "backend": "onnxruntime-cpu", "onnxruntime": onnxruntime.__version__, "precision": "fp32",
            "machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "threads": threads, "batches": [low, high], "peak_bytes": peaks,
            "measured_slope_bytes": int(measured), "slope_floor_bytes": int(floor),
            "slope_floored": measured < floor,
        },
    }
