"""Process memory probes (Linux ``/proc/self/status``, ``getrusage`` elsewhere)."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own
    address space. ``ru_maxrss`` is not used there because the kernel carries it
    over ``fork`` + ``exec``: a runtime started by a large parent (a Python that had
    torch loaded) would report the parent's peak.
    """
    peak_kib = _proc_status_kib("VmHWM")
    if peak_kib is not None:
        return peak_kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``VmRSS``; elsewhere the peak, the best available)."""
    rss_kib = _proc_status_kib("VmRSS")
    return rss_kib * 1024 if rss_kib is not None else peak_rss_bytes()


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of Linux's /proc/self/status, or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
