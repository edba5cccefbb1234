"""Where a prediction's time goes: the steps of ``Result.timings`` and their shares.

``Result.timings`` (milliseconds) holds two kinds of entries:

* **Steps**, measured once each on the thread that runs the prediction, never
  nested and never overlapping, so they add up to the whole: ``decode`` (the image
  files, ``predict_file`` only), ``checks`` (the request's arrays), ``color_stats``
  (whole-image colour statistics), ``color_constancy``, ``hair_removal``,
  ``resize`` (to the model's input, the window grid or the working scale, and the
  mask back), ``tiles`` (cutting tiles or windows into a batch), ``normalize``
  (uint8 to float32 channel-first), ``metadata`` (encoding the fields),
  ``inference:<stage>`` (the backend's run of one stage), ``probabilities``
  (segmenters: logits to probabilities per tile), ``blend`` (segmenters: weighting,
  accumulating and reducing the overlapping tiles to the mask and heatmap) and
  ``review`` (probabilities, temperature and the review rules, or the lesion share).
* **Sums** kept for readers of earlier figures: ``total`` (``predict`` from call
  to return; ``decode`` and a server's ``queue`` come before it), ``preprocess``
  (every pixel step above), ``inference`` (every stage), ``stage:<name>`` (a stage
  with its own feeding) and ``tiled_inference`` (a segmenter's tiling loop).

:func:`breakdown` keeps the steps, adds ``other`` (the glue between steps: Python
calls, small copies) and gives each its share of the whole (docs/performance.md).
Timing costs two ``perf_counter`` calls per step and batch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator, Mapping, Optional

Timings = Dict[str, float]

#: Entries of ``Result.timings`` that add up other entries (see the module docs).
SUMS = ("total", "preprocess", "inference", "tiled_inference")
SUM_PREFIXES = ("stage:",)
#: The steps that make up ``preprocess``.
PIXEL_STEPS = ("color_stats", "color_constancy", "hair_removal", "resize", "tiles", "normalize")
#: What comes before ``predict``'s own clock starts (its ``total`` excludes them).
BEFORE_TOTAL = ("queue", "decode")


def add(timings: Optional[Timings], step: str, ms: float) -> None:
    """Add ``ms`` to ``timings[step]`` (a step may run once per tile batch)."""
    if timings is not None:
        timings[step] = timings.get(step, 0.0) + ms


@contextmanager
def timed(timings: Optional[Timings], step: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[step]``; nothing when ``timings`` is None."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        add(timings, step, (time.perf_counter() - start) * 1000)


def is_step(name: str) -> bool:
    return name not in SUMS and not name.startswith(SUM_PREFIXES)


def add_sums(timings: Timings) -> None:
    """Fill in ``preprocess`` and ``inference`` from the steps (the sums earlier releases reported)."""
    timings["preprocess"] = sum(timings.get(s, 0.0) for s in PIXEL_STEPS)
    timings["inference"] = sum(v for k, v in timings.items() if k.startswith("inference:"))


def whole_ms(timings: Mapping[str, float]) -> float:
    """The whole a share is of: ``total`` plus what came before ``predict`` (decode, queue)."""
    return float(timings.get("total", 0.0)) + sum(float(timings.get(k, 0.0)) for k in BEFORE_TOTAL)


def breakdown(timings: Mapping[str, float]) -> Dict[str, Dict[str, float]]:
    """``{step: {"ms": ..., "share": ...}}`` for every step and ``other``, largest first.

    ``other`` is the whole less the steps: never negative by construction of the
    steps (sequential, inside the whole), but clipped at 0 for clock rounding.
    """
    whole = whole_ms(timings)
    steps = {k: float(v) for k, v in timings.items() if is_step(k)}
    steps["other"] = max(0.0, whole - sum(steps.values()))
    ordered = sorted(steps.items(), key=lambda kv: -kv[1])
    return {k: {"ms": v, "share": v / whole if whole > 0 else float("nan")} for k, v in ordered}
