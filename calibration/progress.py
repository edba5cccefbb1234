"""Where ``quantize`` spends its time and memory, and how long is left.

``quantize`` on a paper-size bundle runs for minutes: every phase (fp32 pass for the
stage inputs, calibration of each stage, agreement passes, sensitivity, fidelity,
latency) is timed, and its wall time, CPU time (all threads of the process) and
peak resident memory go into the report under ``profile``. Phases that go through
images print ``k/N images`` with the time left in the phase and, when the phases still
to come are known in images, the time left overall.

Decisions:
- Per-phase peak memory: on Linux the peak (``VmHWM``) is reset at the start of each
  phase (``/proc/self/clear_refs``), so a phase's figure is its own high-water mark,
  not the largest of the phases before it; the whole run's peak is the largest phase
  peak. Where the reset is not possible the figure is the process peak so far (the
  report says ``peak_is_per_phase: false``).
- Time left = seconds per image measured so far in the phase x images left; overall
  adds the planned images of later phases at the slowest per-image rate measured yet
  (an fp32 pass is the slowest kind), so the estimate errs long rather than short.
- Progress lines go through the caller's ``say`` (stderr under ``--json``); one line
  per image at most, and never more often than every ``min_interval`` seconds except
  for the last image of a phase.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from edgederm.runtime.rss import current_rss_bytes, peak_rss_bytes


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux); False where not possible."""
    for span in _open_spans:  # the spans in progress keep the peak they saw so far
        span.peak = max(span.peak, peak_rss_bytes())
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Span:
    def __init__(self, peak: int) -> None:
        self.peak = peak


_open_spans: list[_Span] = []
PER_PHASE_PEAK = os.access("/proc/self/clear_refs", os.W_OK)  # Linux: the peak can be reset per phase


@contextlib.contextmanager
def peak_span() -> Iterator[Callable[[], int]]:
    """Peak RSS (bytes) within the block: the yielded function gives it so far. Spans nest:
    a span opened inside another resets the kernel's mark without losing the outer one's."""
    exact = reset_peak_rss()
    span = _Span(current_rss_bytes() if exact else peak_rss_bytes())
    _open_spans.append(span)
    try:
        yield lambda: max(span.peak, peak_rss_bytes())
    finally:
        del _open_spans[next(i for i, s in enumerate(_open_spans) if s is span)]
        inner = max(span.peak, peak_rss_bytes())
        for outer in _open_spans:
            outer.peak = max(outer.peak, inner)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0
    images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.name, "seconds": round(self.seconds, 2),
                               "cpu_seconds": round(self.cpu_seconds, 2),
                               "peak_rss_mib": round(self.peak_rss_bytes / 2 ** 20, 1)}
        if self.images is not None:
            out["images"] = self.images
        return out


@dataclass
class Profile:
    """Phase timer with progress lines and estimates of the time left."""

    say: Callable[[str], None] = lambda m: None
    clock: Callable[[], float] = time.monotonic
    cpu_clock: Callable[[], float] = time.process_time
    min_interval: float = 5.0
    phases: list[Phase] = field(default_factory=list)
    planned: dict[str, int] = field(default_factory=dict)  # later phases -> images they will run
    per_image: float = 0.0  # slowest seconds per image measured so far

    def plan(self, name: str, images: int) -> None:
        """Announce a later phase of ``images`` images (for the overall estimate)."""
        self.planned[name] = self.planned.get(name, 0) + images

    @contextlib.contextmanager
    def phase(self, name: str, images: int | None = None) -> Iterator[Callable[[int], None]]:
        """Time a phase; the yielded ``tick(k)`` reports that ``k`` of ``images`` are done."""
        with peak_span() as peak, self._timed(name, images) as tick:
            yield tick
        self.phases[-1].peak_rss_bytes = peak()

    @contextlib.contextmanager
    def _timed(self, name: str, images: int | None) -> Iterator[Callable[[int], None]]:
        start, cpu0 = self.clock(), self.cpu_clock()
        record = Phase(name, images=images)
        last = [start]
        if images:
            self.say(f"  [{name}] {images} image(s)")

        def tick(done: int) -> None:
            now = self.clock()
            if not images or done <= 0:
                return
            rate = (now - start) / done
            if done == images or now - last[0] >= self.min_interval or done == 1:
                last[0] = now
                phase_left = rate * (images - done)
                line = (f"  [{name}] {done}/{images} images, {rate:.1f} s/image, "
                        f"~{format_seconds(phase_left)} left in this phase")
                later = sum(n for k, n in self.planned.items() if k != name)
                if later:
                    overall = phase_left + later * max(self.per_image, rate)
                    line += f", ~{format_seconds(overall)} overall"
                self.say(line)

        try:
            yield tick
        finally:
            record.seconds = self.clock() - start
            record.cpu_seconds = self.cpu_clock() - cpu0
            self.phases.append(record)
            self.planned.pop(name, None)
            if images:
                self.per_image = max(self.per_image, record.seconds / images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phases": [p.to_dict() for p in self.phases],
            "seconds": round(sum(p.seconds for p in self.phases), 2),
            "cpu_seconds": round(sum(p.cpu_seconds for p in self.phases), 2),
            "peak_rss_mib": round(max((p.peak_rss_bytes for p in self.phases), default=0) / 2 ** 20, 1),
            "peak_is_per_phase": PER_PHASE_PEAK,
        }

    def lines(self) -> list[str]:
        """The profile as a table (phase, wall s, CPU s, peak MiB)."""
        rows = [f"  {'phase':<44} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}"]
        for p in self.phases:
            rows.append(f"  {p.name:<44} {p.seconds:8.1f} {p.cpu_seconds:8.1f} {p.peak_rss_bytes / 2 ** 20:9.0f}")
        total = self.to_dict()
        rows.append(f"  {'total':<44} {total['seconds']:8.1f} {total['cpu_seconds']:8.1f} {total['peak_rss_mib']:9.0f}")
        return rows
