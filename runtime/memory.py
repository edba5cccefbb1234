"""Memory planning: a budget ("1.5GiB") -> the tile batch that keeps the process under it.

Model of the process peak (``docs/architecture.md``, tiling and memory):

    peak = fixed + per_tile x batch + image buffers + accumulators + margin

* ``fixed`` and ``per_tile`` are *measured*, not guessed: at export,
  ``edgederm.export.memory_profile`` runs the bundle's graphs in a fresh process
  on this backend (ONNX Runtime, CPU) at two batches of the profiled stage (the
  tiled stage; for a classifier, the stage fed the whole image) and fits a line
  through the two process peaks. ``fixed`` therefore includes Python, numpy,
  OpenCV, ONNX Runtime and every session of the bundle; ``per_tile`` the
  activations, the arena growth, the uint8 tile and its float copy. The manifest
  keeps them under ``"memory"`` with what they were measured on.
* image buffers and accumulators are *computed* from the image size, since they
  are plain numpy arrays whose size is known: the caller's uint8 image, the
  uint8 mask and float32 heatmap at input resolution, the row band of the tiler
  (``(K + 1) x tile x width`` float32) and its per-block temporaries; for windowed
  classifiers the image resized to the window grid.
* ``margin`` is a fixed fraction (:data:`MARGIN_FRACTION`) of the budget for
  allocator fragmentation and measurement noise (10-15 % on a shared-memory device).

The batch is ``floor((budget - fixed - image - accumulators - margin) / per_tile)``,
capped at :data:`MAX_TILE_BATCH` (larger batches stop paying on CPUs and small
GPUs) and at the number of tiles the image has. If not even one tile fits, a
:class:`MemoryBudgetError` says the smallest budget that would; a budget larger
than this machine's memory is refused too (it could not be honoured).
:func:`plan` is the one planner: the runtime, export (the bundle's default batch)
and the engine builder (profile shapes) all call it.

On a device (``plan(..., target=profile, precision=P)``; ``edgederm plan``): CPU and GPU
share one DRAM on a Jetson, so the plan predicts the peak of that unified memory and the
budget is the target's memory less what its OS keeps. The fixed part becomes, term by term:

* ``runtime``: measured, the profile's ``fixed`` less the graphs it was measured with
  (Python, numpy, OpenCV, the inference library, the runtime);
* ``weights``: the bytes of the bundle's graph files of precision P;
* ``cuda_context`` (CUDA with TensorRT's libraries) and ``tensorrt_workspace`` (the
  scratch bound TensorRT's tactics may use): the target profile's figures, from the
  sources it names, *not measured here*;

and the per-tile slope is the measured fp32 one scaled by :data:`ACTIVATION_SCALE`: fp16
activations are half as wide; int8 engines are planned at fp16 width too, since the
layers outside Q/DQ pairs (softmax, LayerNorm, GELU) run in fp16 and TensorRT does not
say ahead of the build which do. The GPU terms are stated as unmeasured in the plan.

Sizes: :func:`parse_size` is the one size parser. It takes an int (bytes) or a
string with a unit: ``KiB, MiB, GiB, TiB`` are powers of 1024 and so are the bare
``K, M, G, T`` (as in ``ulimit`` or ``docker -m``): ``"512M"`` = ``"512MiB"`` =
512 x 2^20 bytes. ``kB, MB, GB, TB`` are SI, powers of 1000: ``"800MB"`` = 800 x 10^6.
A float is accepted only when it is a whole number of bytes (``1.5`` is refused).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Tuple

from .bundle import Manifest, MemoryProfile
from .errors import InputError, MemoryBudgetError

if TYPE_CHECKING:
    from .targets import TargetProfile

__all__ = [
    "MARGIN_FRACTION", "MAX_TILE_BATCH", "MemoryProfile", "MemoryPlan", "parse_size", "format_size",
    "segment_buffers", "window_buffers", "plan_batch", "plan", "machine_memory_bytes", "ACTIVATION_SCALE",
    "device_profile", "graph_bytes",
]

MARGIN_FRACTION = 0.10
MAX_TILE_BATCH = 32
# Activation bytes on a device per fp32 byte measured on the CPU (see the module docstring).
ACTIVATION_SCALE = {"fp32": 1.0, "fp16": 0.5, "int8": 0.5}
# The device plan's terms that come from the target profile, not from a measurement.
UNMEASURED_TERMS = ("cuda_context", "tensorrt_workspace", "os_reserved")

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """``"1.5GiB"``, ``"800MB"``, ``"512M"``, ``2**30`` -> bytes (int)."""
    if isinstance(value, bool):
        raise InputError(f"memory size {value!r} is a bool; expected bytes (int) or a string like '1.5GiB' or '800MB'")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(f"memory size {value!r} is not a whole number of bytes; expected int bytes or a string "
                         "like '1.5GiB' or '800MB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match or match.group(2).lower() not in _UNITS:
            raise InputError(
                f"memory size {value!r} is not understood; expected a number with an optional unit "
                "(B, KiB, MiB, GiB, kB, MB, GB; K/M/G mean KiB/MiB/GiB), e.g. '1.5GiB' or '800MB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise InputError(f"memory size has type {type(value).__name__}; expected int bytes or a string like '1.5GiB'")
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"memory size {value!r} must be a positive, finite amount, e.g. '1.5GiB'")
    if _UNITS[unit] == 1 and not number.is_integer():
        raise InputError(f"memory size {value!r} is not a whole number of bytes; give bytes as an integer "
                         "or use a unit, e.g. '1.5GiB'")
    return int(number * _UNITS[unit])


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, where the OS tells."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def format_size(n: float) -> str:
    """Bytes as a short human string in binary units ("1.42 GiB")."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    """The batch chosen for one image size, and the parts of the predicted peak."""

    batch_size: int
    budget_bytes: int | None
    fixed_bytes: int
    per_tile_bytes: int
    image_bytes: int
    accumulator_bytes: int
    margin_bytes: int
    # On a device: the fixed part term by term ((name, bytes), summing to fixed_bytes), and
    # which of them are figures from the target profile rather than measurements.
    fixed_parts: Tuple[Tuple[str, int], ...] = ()
    unmeasured: Tuple[str, ...] = ()
    target: str = ""
    precision: str = ""

    @property
    def predicted_peak_bytes(self) -> int:
        return self.fixed_bytes + self.per_tile_bytes * self.batch_size + self.image_bytes + self.accumulator_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes, "fixed_bytes": self.fixed_bytes,
            "per_tile_bytes": self.per_tile_bytes, "image_bytes": self.image_bytes,
            "accumulator_bytes": self.accumulator_bytes, "margin_bytes": self.margin_bytes,
            "fixed_parts": dict(self.fixed_parts), "unmeasured": list(self.unmeasured),
            "target": self.target, "precision": self.precision,
        }


def segment_buffers(height: int, width: int, tile: int, stride: int, channels: int) -> tuple[int, int]:
    """(image buffers, accumulators) in bytes for tiled segmentation of ``height x width``.

    Image buffers: the caller's uint8 RGB image, the uint8 mask and the float32
    heatmap. Accumulators: the tiler's band (K sums + 1 weight, ``tile`` rows of
    the padded width), its ``K x tile x tile`` scratch, and per finalised block of
    ``stride`` rows the K-channel float32 block, the argmax (int64) and a float32
    temporary of the reduction.
    """
    padded_w, band_rows = max(width, tile), min(tile, max(height, tile))
    image = height * width * 3 + height * width + height * width * 4
    block_rows = min(stride, height)
    accumulators = ((channels + 1) * band_rows * padded_w * 4 + channels * tile * tile * 4
                    + channels * block_rows * width * 4 + block_rows * width * (8 + 4))
    return image, accumulators


def window_buffers(height: int, width: int, window: int, rows: int, cols: int, embedding_dim: int) -> tuple[int, int]:
    """(image buffers, accumulators) for a windowed classifier: the caller's image, the
    image resized to the window grid, and the ``G x D`` embedding matrix."""
    image = height * width * 3 + rows * window * cols * window * 3
    return image, rows * cols * max(embedding_dim, 1) * 4


def plan_batch(
    profile: MemoryProfile | None,
    budget: int | None,
    image_bytes: int,
    accumulator_bytes: int,
    *,
    default_batch: int = 4,
    max_batch: int = MAX_TILE_BATCH,
    tiles: int | None = None,
    what: str = "this image",
) -> MemoryPlan:
    """The largest tile batch whose predicted peak (plus margin) fits ``budget``.

    Without a budget, ``default_batch`` (the bundle's tiling.batch_size). Without a
    profile, a budget cannot be planned: the caller decides (the runtime warns).
    """
    cap = max(1, min(max_batch, tiles if tiles else max_batch))
    if budget is None or profile is None:
        fixed = profile.fixed_bytes if profile else 0
        slope = profile.per_tile_bytes if profile else 0
        return MemoryPlan(max(1, min(default_batch, cap)), budget, fixed, slope, image_bytes, accumulator_bytes, 0)
    margin = int(budget * MARGIN_FRACTION)
    room = budget - margin - profile.fixed_bytes - image_bytes - accumulator_bytes
    batch = room // profile.per_tile_bytes if room > 0 else 0
    if batch < 1:
        need = profile.fixed_bytes + profile.per_tile_bytes + image_bytes + accumulator_bytes
        minimum = int(math.ceil(need / (1.0 - MARGIN_FRACTION)))
        raise MemoryBudgetError(
            f"memory budget {format_size(budget)} ({budget} bytes) cannot be met for {what}: one tile needs "
            f"{format_size(minimum)} ({minimum} bytes) = fixed {format_size(profile.fixed_bytes)} "
            f"+ per tile {format_size(profile.per_tile_bytes)} + image buffers {format_size(image_bytes)} "
            f"+ accumulators {format_size(accumulator_bytes)} + {MARGIN_FRACTION:.0%} margin. "
            f"Fix: give memory_budget of at least {format_size(minimum)}, or a smaller image"
        )
    return MemoryPlan(int(min(batch, cap)), budget, profile.fixed_bytes, profile.per_tile_bytes,
                      image_bytes, accumulator_bytes, margin)


def graph_bytes(bundle: Manifest, precision: str) -> int:
    """Bytes of every stage's graph file of ``precision`` (the weights a session or engine holds)."""
    total = 0
    for stage in bundle.stages:
        path = bundle.graph_path(stage, precision)
        entry = bundle.files.get(stage.graphs[precision].file)
        total += entry.bytes if entry is not None and entry.bytes is not None else path.stat().st_size
    return total


def device_profile(bundle: Manifest, target: TargetProfile, precision: str) -> tuple[MemoryProfile, tuple[tuple[str, int], ...]]:
    """The bundle's measured profile carried to ``target`` at ``precision``: the fixed part
    term by term (module docstring) and the activation slope at that precision's width."""
    measured = bundle.memory
    if measured is None:
        raise MemoryBudgetError(f"bundle {bundle.root} has no measured memory profile, so no device plan can be made. "
                                "Fix: re-export it with this SDK (export measures the profile)")
    if target.cuda_context_bytes is None or target.tensorrt_workspace_bytes is None:
        raise MemoryBudgetError(f"target {target.name} states no CUDA context or TensorRT workspace figure; "
                                "Fix: add them to its profile's memory_plan section")
    profiled = str(measured.measured_on.get("precision", "fp32"))
    runtime = max(measured.fixed_bytes - graph_bytes(bundle, profiled), 0)
    parts = (("runtime", runtime), ("weights", graph_bytes(bundle, precision)),
             ("cuda_context", target.cuda_context_bytes), ("tensorrt_workspace", target.tensorrt_workspace_bytes))
    # A precision without a known width (int8_dynamic runs on CPUs) is planned at fp32 width.
    slope = int(math.ceil(measured.per_tile_bytes * ACTIVATION_SCALE.get(precision, 1.0) / ACTIVATION_SCALE.get(profiled, 1.0)))
    return MemoryProfile(sum(b for _, b in parts), slope, measured.measured_on, measured.stage), parts


def plan(bundle: Manifest, budget: int | None, height: int, width: int, *,
         max_batch: int = MAX_TILE_BATCH, target: TargetProfile | None = None,
         precision: str = "fp32") -> MemoryPlan:
    """The tile (or window) batch for a ``height x width`` image of ``bundle`` under
    ``budget`` bytes (None: the bundle's ``tiling.batch_size``).

    With a ``target``, the plan is for that device's unified memory at ``precision``
    (module docstring); ``budget`` None is then the target's memory less its OS's share.

    Raises MemoryBudgetError when not even one tile (or, for a classifier, one image)
    fits, naming the minimum, or when ``budget`` exceeds this machine's (or the target's) memory.
    """
    from .tiling import make_grid

    what = f"a {height}x{width} image"
    profile: MemoryProfile | None = bundle.memory
    parts: tuple[tuple[str, int], ...] = ()
    if target is not None:
        profile, parts = device_profile(bundle, target, precision)
        what += f" on {target.name} at {precision}"
        usable = target.memory_bytes - (target.os_reserved_bytes or 0) if target.memory_bytes else None
        if budget is None:
            budget = usable
        elif usable is not None and budget > usable:
            raise MemoryBudgetError(
                f"memory budget {format_size(budget)} ({budget} bytes) is more than {target.name} leaves to an app "
                f"({format_size(usable)}: {format_size(target.memory_bytes or 0)} less the OS's "
                f"{format_size(target.os_reserved_bytes or 0)}). Fix: give memory_budget of at most {format_size(usable)}"
            )
    elif budget is not None:
        physical = machine_memory_bytes()
        if physical is not None and budget > physical:
            raise MemoryBudgetError(
                f"memory budget {format_size(budget)} ({budget} bytes) is more than this machine has "
                f"({format_size(physical)}); a plan for it would not keep the process under anything. "
                f"Fix: give memory_budget of at most {format_size(physical)}"
            )
    stage = bundle.tiled_stage
    if stage is None:
        batch_plan = plan_batch(profile, budget, height * width * 3, 0, default_batch=1, tiles=1, what=what)
        return _on_target(batch_plan, parts, target, precision)
    if bundle.model.task == "segment":
        tile = bundle.tile_size
        grid = make_grid(height, width, tile, bundle.tiling.overlap)
        channels = stage.outputs[0].shape[1] if len(stage.outputs[0].shape) > 1 else None
        image, acc = segment_buffers(height, width, tile, grid.stride,
                                     channels if isinstance(channels, int) else max(len(bundle.model.class_names), 1))
        tiles = len(grid)
    else:
        window, rows, cols = bundle.window_layout
        dim = stage.outputs[0].shape[-1]
        image, acc = window_buffers(height, width, window, rows, cols, dim if isinstance(dim, int) else 1024)
        tiles = rows * cols
    batch_plan = plan_batch(profile, budget, image, acc, default_batch=bundle.tiling.batch_size, tiles=tiles,
                            max_batch=max_batch, what=what)
    return _on_target(batch_plan, parts, target, precision)


def _on_target(batch_plan: MemoryPlan, parts: tuple[tuple[str, int], ...], target: TargetProfile | None,
               precision: str) -> MemoryPlan:
    if target is None:
        return batch_plan
    unmeasured = tuple(t for t in UNMEASURED_TERMS if t in dict(parts) or (t == "os_reserved" and target.os_reserved_bytes))
    return dataclasses.replace(batch_plan, fixed_parts=parts, unmeasured=unmeasured, target=target.name, precision=precision)
