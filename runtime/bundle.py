"""Reading and verifying a bundle: ``manifest.json`` and the files it names.

The runtime trusts nothing in a bundle it has not checked: every file listed in the
manifest must stay inside the bundle (no ``..``, no absolute paths, no links out) and
match its sha256 before any graph is handed to a backend. Nothing is unpickled.
Writers (edgederm.export, edgederm.calibration) use :func:`write_json_atomic` and
:func:`sha256_file` from here so the format has one definition.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import BundleError, BundleIntegrityError
from .files import Refuse, read_regular_file

MANIFEST = "manifest.json"
FORMAT = "edgederm-bundle"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8_dynamic")
#: A manifest is a few kB; anything near this is not one.
MAX_MANIFEST_BYTES = 16 << 20


def _refuse_manifest(path: Path) -> Refuse:
    def refuse(problem: str, fix: str) -> NoReturn:
        raise BundleError(f"cannot read {path}: {problem}; {fix}")
    return refuse


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """JSON (indented, trailing newline) through :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def resolve_inside(root: Path, name: str) -> Path:
    """The path of bundle file ``name``; refuses names that leave the bundle."""
    if not isinstance(name, str) or not name:
        raise BundleIntegrityError(f"manifest names a file as {name!r}; expected a relative path inside the bundle")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleIntegrityError(f"manifest entry {name!r} is an absolute path; bundle files must be relative to the bundle")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise BundleIntegrityError(f"manifest entry {name!r} points outside the bundle ('..' is not allowed)")
    root_real = root.resolve()
    path = (root / name).resolve()
    if root_real != path and root_real not in path.parents:
        raise BundleIntegrityError(f"manifest entry {name!r} resolves to {path}, outside the bundle {root_real} (a link?)")
    return path


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.data.get("preprocess", {})

    @property
    def clinical(self) -> dict[str, Any]:
        return self.data.get("clinical", {})

    def precisions(self) -> list[str]:
        """Precisions available for every stage, in PRECISIONS order."""
        common = set.intersection(*(set(s["graphs"]) for s in self.stages)) if self.stages else set()
        return [p for p in PRECISIONS if p in common]

    def graph_path(self, stage: dict[str, Any], precision: str) -> Path:
        graph = stage["graphs"].get(precision)
        if graph is None:
            raise BundleError(
                f"stage {stage['name']!r} has no {precision} graph; available: {sorted(stage['graphs'])}. "
                f"Fix: run `edgederm quantize {self.root} --precision {precision}` or pick another precision"
            )
        return resolve_inside(self.root, graph["file"])


def read_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Parse ``manifest.json`` and (by default) verify every listed file's sha256."""
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is not a directory; expected a folder written by `edgederm export`")
    path = root / MANIFEST
    if not os.path.lexists(path):
        raise BundleError(f"{str(root)!r} has no {MANIFEST}: not a bundle, or an export that did not finish")
    try:
        data = json.loads(read_regular_file(path, MAX_MANIFEST_BYTES, _refuse_manifest(path)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path} is not an EdgeDerm manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {data['format_version']}, this SDK reads up to {FORMAT_VERSION}; upgrade edgederm"
        )
    for key in ("model", "stages", "files"):
        if key not in data:
            raise BundleError(f"{path} lacks the {key!r} section; re-export the bundle")
    manifest = Manifest(root, data)
    files = data["files"]
    for stage in manifest.stages:
        for precision, graph in stage.get("graphs", {}).items():
            if graph["file"] not in files:
                raise BundleIntegrityError(f"stage {stage['name']!r} {precision} graph {graph['file']!r} is not in the manifest's file table")
    if verify:
        for name, entry in files.items():
            file_path = resolve_inside(root, name)
            if not file_path.is_file():
                raise BundleIntegrityError(f"bundle file {name!r} is missing from {root}")
            actual = sha256_file(file_path)
            if actual != entry.get("sha256"):
                raise BundleIntegrityError(
                    f"bundle file {name!r} does not match its manifest sha256 (expected {entry.get('sha256')}, "
                    f"got {actual}): the file was changed or corrupted; re-export or re-copy the bundle"
                )
    else:
        for name in files:
            resolve_inside(root, name)
    return manifest
