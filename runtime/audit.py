"""Tamper-evident audit log: one hash-chained JSON line per prediction.

Each line is a JSON object (keys sorted, no spaces) holding ``seq`` (0, 1, 2, ...
across rotations), ``prev`` (sha256 of the previous line's bytes; 64 zeros for
the first) and ``hash`` (sha256 of the record without ``hash``). ``verify_log``
names the first bad line: an edited line fails its own ``hash``; a deleted,
inserted or reordered line breaks ``prev`` or ``seq`` where it happens.

What goes in (``record``): time (UTC), bundle id (sha256 of manifest.json, the file
a signature covers), signer key id, precision, backend, engine key (TensorRT
engines' sha256, when one runs), sha256 of each input image's pixels (shape
prefixed; never the pixels), the tile plan, label, probabilities, review reasons,
latency, and only the metadata fields the app allowed (``allowed_metadata``).

Writers in several threads (a lock) and several processes (``fcntl.flock`` on
``LOG.lock``, a file that is never renamed) append in turn; each append reads the
current tail under the lock, so the chain stays one chain. Rotation (``max_bytes``)
renames ``LOG`` to ``LOG.1`` (``LOG.1`` to ``LOG.2``, ...) under the same lock and
the next record's ``prev`` is the last line of ``LOG.1``: ``verify_log`` reads the
rotated files oldest first and checks one chain through them.

What it does not stop: someone who can rewrite the whole log can rebuild a valid
chain. Send the head (``verify_log(...).head``) off the device to anchor it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from .errors import AuditLogError

if TYPE_CHECKING:
    from .model import DeployedModel
    from .result import Result

GENESIS = "0" * 64
FORMAT = "edgederm-audit/1"


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _record_hash(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return _line_hash(_dumps(body))


def _dumps(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def image_sha256(image: np.ndarray) -> str:
    """sha256 of an image's shape and uint8 pixels: identifies the input without storing it."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}".encode())
    digest.update(array.data)
    return digest.hexdigest()


def _last_line(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            block = 4096
            data = b""
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start) + data
                lines = data.rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or start == 0:
                    return lines[-1] if lines[-1] else None
                end = start
    except FileNotFoundError:
        return None
    return None


class AuditLog:
    """Appends hash-chained records to ``path``; safe across threads and processes."""

    def __init__(self, path: str | os.PathLike[str], allowed_metadata: Iterable[str] = (),
                 max_bytes: int | None = None, keep: int = 10, fsync: bool = True) -> None:
        self.path = Path(path)
        self.allowed_metadata = frozenset(allowed_metadata)
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.with_name(self.path.name + ".lock").touch(exist_ok=True)
        except OSError as exc:
            raise AuditLogError(f"cannot write audit log {self.path} ({exc}); pass a writable audit_log path") from exc

    def record(self, model: DeployedModel, result: Result, *, dermoscopy: np.ndarray | None = None,
               clinical: np.ndarray | None = None, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The audit record of one prediction, appended to the chain."""
        run = model.last_run or {}
        entry: dict[str, Any] = {
            "bundle_id": bundle_id(model.manifest.root),
            "signer": model.signature.key_id if model.signature is not None else None,
            "precision": result.precision,
            "backend": result.backend,
            "engine": _engine_key(model),
            "images": {name: image_sha256(array) for name, array in
                       (("dermoscopy", dermoscopy), ("clinical", clinical)) if array is not None},
            "tile_plan": {k: run[k] for k in ("tiles", "windows", "batch_size", "stage") if k in run},
            "label": result.label,
            "probabilities": {k: round(float(v), 7) for k, v in result.probabilities.items()},
            "review_reasons": list(result.review_reasons),
            "latency_ms": round(float(result.timings.get("total", 0.0)), 3),
        }
        if metadata and self.allowed_metadata:
            entry["metadata"] = {k: metadata[k] for k in sorted(self.allowed_metadata) if k in metadata}
        return self.append(entry)

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Chain ``entry`` (adds time, seq, prev, hash) and append it as one line."""
        import fcntl

        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if self.max_bytes is not None and self.path.exists() and self.path.stat().st_size >= self.max_bytes:
                    self._rotate()
                last = _last_line(self.path)
                if last is None:
                    last = _last_line(self._rotated(1))
                prev, seq = (GENESIS, 0) if last is None else (_line_hash(last), int(json.loads(last)["seq"]) + 1)
                record = {"format": FORMAT, "seq": seq, "prev": prev,
                          "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                          **entry}
                record["hash"] = _record_hash(record)
                line = _dumps(record) + b"\n"
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except (OSError, ValueError) as exc:
                raise AuditLogError(f"cannot append to audit log {self.path}: {exc}") from exc
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return record

    def _rotated(self, k: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{k}")

    def _rotate(self) -> None:
        self._rotated(self.keep).unlink(missing_ok=True)
        for k in range(self.keep - 1, 0, -1):
            if self._rotated(k).exists():
                os.replace(self._rotated(k), self._rotated(k + 1))
        os.replace(self.path, self._rotated(1))


_BUNDLE_IDS: dict[str, tuple[float, str]] = {}


def bundle_id(root: str | os.PathLike[str]) -> str:
    """sha256 of the bundle's manifest.json (cached while its mtime stays the same)."""
    path = Path(root) / "manifest.json"
    mtime = path.stat().st_mtime
    cached = _BUNDLE_IDS.get(str(path))
    if cached is None or cached[0] != mtime:
        cached = (mtime, hashlib.sha256(path.read_bytes()).hexdigest())
        _BUNDLE_IDS[str(path)] = cached
    return cached[1]


def _engine_key(model: DeployedModel) -> list[str] | None:
    if model.backend_name != "tensorrt":
        return None
    return sorted(str(e.get("sha256")) for e in model.manifest.engines
                  if e.get("precision") == model.precision)


@dataclass
class LogReport:
    records: int = 0
    files: list[str] = field(default_factory=list)
    head: str = GENESIS  # sha256 of the last line: anchor it off the device
    first_bad: str | None = None  # "FILE:LINE: why"

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """``LOG.N ... LOG.1, LOG``: rotated files oldest first, then the live one."""
    base = Path(path)
    rotated = sorted((p for p in base.parent.glob(base.name + ".*") if p.name[len(base.name) + 1:].isdigit()),
                     key=lambda p: -int(p.name[len(base.name) + 1:]))
    return rotated + ([base] if base.exists() else [])


def verify_log(path: str | os.PathLike[str], partial: bool = False) -> LogReport:
    """Check the chain through ``LOG`` and its rotated files; the report names the first bad line.

    The chain must start at its first record (seq 0) unless ``partial``: when rotation
    has dropped the oldest files (more than ``keep``), the oldest file kept starts mid-chain.
    """
    files = log_files(path)
    if not files:
        raise AuditLogError(f"audit log {path} does not exist")
    report = LogReport(files=[str(p) for p in files])
    prev_line: bytes | None = None
    expected_seq: int | None = None
    for file in files:
        with open(file, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line = raw.rstrip(b"\n")
                where = f"{file}:{number}"
                problem = _check_line(line, prev_line, expected_seq, partial)
                if problem:
                    report.first_bad = f"{where}: {problem}"
                    return report
                record = json.loads(line)
                expected_seq = int(record["seq"]) + 1
                prev_line = line
                report.records += 1
                report.head = _line_hash(line)
    return report


def _check_line(line: bytes, prev_line: bytes | None, expected_seq: int | None, partial: bool) -> str | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not a JSON record ({exc}): edited or truncated"
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return "not an audit record"
    if record.get("hash") != _record_hash(record):
        return "the record does not match its own hash: edited"
    if prev_line is None:
        if partial and record.get("seq") != 0:
            return None
        if record.get("seq") != 0 or record.get("prev") != GENESIS:
            return (f"the log starts at seq {record.get('seq')}, not at the chain's first record: lines were deleted "
                    "here (or rotation dropped older files: verify with --partial)")
        return None
    if record.get("prev") != _line_hash(prev_line):
        return "prev does not match the line before: a line was deleted, inserted or moved here"
    if record.get("seq") != expected_seq:
        return f"seq {record.get('seq')} where {expected_seq} was expected: a line was deleted, inserted or moved here"
    return None
