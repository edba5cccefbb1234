"""Small JSON entries in the per-CPU cache folder (beside the optimised graphs, see
``backends.onnxruntime.cache_dir``): a measured latency, a CPU re-check verdict.

Each entry names its ``key`` and carries the sha256 of its other fields, so a damaged,
tampered or mis-keyed entry is never believed: it is reported and computed again.
A cache never stops a load: unreadable entries and unwritable folders are warnings.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .bundle import write_bytes_atomic

log = logging.getLogger(__name__)


def _checksum(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()


def read_entry(path: Path, key: str, what: str, otherwise: str) -> Optional[Dict[str, Any]]:
    """The fields of the entry at ``path`` when it is ``key``'s and its checksum matches;
    None when absent, or (with a warning: ``what`` and ``otherwise`` say what it is and
    what happens instead) when it does not."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = {k: v for k, v in data.items() if k != "sha256"}
        if fields.get("key") == key and data.get("sha256") == _checksum(fields):
            return fields
        log.warning("%s %s does not match its recorded sha256; %s", what, path, otherwise)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged cache never stops a load
        log.warning("%s %s unusable (%s); %s", what, path, exc, otherwise)
    return None


def write_entry(path: Path, fields: Mapping[str, Any], what: str) -> None:
    """Write ``fields`` (with their ``key``) and their checksum atomically."""
    try:
        write_bytes_atomic(path, json.dumps({**fields, "sha256": _checksum(fields)}, sort_keys=True).encode())
    except OSError as exc:
        log.warning("%s not written to %s (%s); set EDGEDERM_CACHE", what, Path(path).parent, exc)
