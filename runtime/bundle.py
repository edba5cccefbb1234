"""Reading, verifying and writing a bundle: ``manifest.json`` and the files it names.

``read_manifest`` parses the manifest once into typed records (:class:`Manifest`,
:class:`Stage`, :class:`TensorSpec`, :class:`Tiling`, :class:`Clinical` ...); every
malformed or out-of-range value is a :class:`ManifestError` naming the field, the
value found and what is allowed. The format is described in ``docs/bundle.md``.

The runtime trusts nothing in a bundle it has not checked: every file listed in the
manifest must stay inside the bundle (no ``..``, no absolute paths, no links out) and
match its sha256 before any graph is handed to a backend. The sha256 computed from the
bytes read at verification is kept (``Manifest.verified``): caches are keyed by it,
never by the manifest's claim. Nothing is unpickled.

Writers (export, quantize, build) go through :func:`write_manifest`, which checks the
new manifest with the same parser and replaces ``manifest.json`` atomically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from .cpu import KERNEL_CLASSES
from .errors import BundleError, BundleIntegrityError, InputError, ManifestError
from .files import Refuse, read_regular_file
from .preprocess import PreprocessConfig

MANIFEST = "manifest.json"
FORMAT = "edgederm-bundle"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8_dynamic")
TASKS = ("classify", "segment")
IMAGE_SOURCES = ("dermoscopy", "dermoscopy_windows", "clinical")
OTHER_SOURCES = ("metadata", "modality_mask")

# Tiling defaults: the one place they live (export writes them, the runtime, calibration
# and the engine builder read them through :class:`Tiling`).
DEFAULT_OVERLAP = 0.25
DEFAULT_BLEND = "gaussian"
DEFAULT_TILE_BATCH = 4
BLENDS = ("gaussian", "constant")
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


def write_manifest(root: str | os.PathLike[str], data: Mapping[str, Any]) -> Manifest:
    """The one manifest writer: check ``data`` with the reader's rules, then replace
    ``root/manifest.json`` atomically. Returns the parsed manifest (files not re-hashed)."""
    manifest = parse_manifest(json.loads(json.dumps(data)), Path(root))
    write_json_atomic(Path(root) / MANIFEST, data)
    return manifest


def resolve_inside(root: Path, name: str) -> Path:
    """The path of bundle file ``name``; refuses names that leave the bundle."""
    if not isinstance(name, str) or not name:
        raise BundleIntegrityError(f"manifest names a file as {name!r}; expected a relative path inside the bundle")
    if "\x00" in name:
        raise BundleIntegrityError(f"manifest file name {name!r} contains a NUL character; allowed: a relative path "
                                   "without control characters. Re-export the bundle")
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


# --------------------------------------------------------------------------- typed records


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (ints, or a name for a dynamic axis), dtype;
    an input also names its ``source`` (see :data:`IMAGE_SOURCES`, :data:`OTHER_SOURCES`,
    or ``"<earlier stage>.<output>"``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    source: str = ""

    def static(self, start: int = 0) -> tuple[int, ...] | None:
        """The dimensions from ``start`` on when all are fixed ints, else None."""
        tail = self.shape[start:]
        return tuple(int(d) for d in tail) if all(isinstance(d, int) for d in tail) else None


@dataclass(frozen=True)
class QuantizedOn:
    """The CPU an int8 graph was quantized and measured on, and the int8 kernel class it
    was made for (runtime/cpu.py). ``saturation_free``: its u8 x s8 products cannot
    saturate in 16 bits on any class (weights within +-64), so every CPU computes it alike."""

    kernel_class: str
    made_for: str
    saturation_free: bool
    arch: str = ""
    features: tuple[str, ...] = ()
    form: str = ""


@dataclass(frozen=True)
class GraphFile:
    file: str
    sha256: str
    quantized_on: QuantizedOn | None = None  # int8 graphs written by this SDK's quantize; None before it recorded it


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    graphs: Mapping[str, GraphFile]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(i.source for i in self.inputs)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    class_names: tuple[str, ...]
    modalities: tuple[str, ...] = ("dermoscopy",)
    input_size: tuple[int, int] | None = None
    metadata_schema: Any = None
    architecture: str = ""


@dataclass(frozen=True)
class Tiling:
    """The manifest's "tiling", defaults applied. ``tile`` None: the model's input size.

    Segmenters are tiled (``tile``, ``overlap``, ``blend``); windowed classifiers cut
    the image into a ``grid`` of ``window`` px windows; ``working_max_side`` rescales
    large images before tiling; ``batch_size`` is the batch without a memory budget.
    """

    tile: int | None = None
    overlap: float = DEFAULT_OVERLAP
    blend: str = DEFAULT_BLEND
    batch_size: int = DEFAULT_TILE_BATCH
    window: int | None = None
    grid: tuple[int, int] | None = None
    working_max_side: int | None = None


@dataclass(frozen=True)
class MemoryProfile:
    """What export measured (runtime/memory.py plans with it): process peak =
    ``fixed_bytes + per_tile_bytes x batch`` of the profiled ``stage``."""

    fixed_bytes: int
    per_tile_bytes: int
    measured_on: Mapping[str, Any] = field(default_factory=dict)
    stage: str = ""


@dataclass(frozen=True)
class Clinical:
    """Temperature and review settings; ``settings`` is the validated section the
    review rules (runtime/safety.py) read."""

    temperature: float = 1.0
    review_threshold: float = 0.0
    settings: Mapping[str, Any] = field(default_factory=dict)

    def for_precision(self, precision: str) -> Clinical:
        """The settings a ``precision`` graph runs with: ``settings["precisions"][precision]``
        (temperature and review thresholds refitted for that graph by ``edgederm quantize``)
        over the fp32 ones."""
        own = (self.settings.get("precisions") or {}).get(precision)
        return self.with_settings(own) if own else self

    def with_settings(self, own: Mapping[str, Any]) -> Clinical:
        """These settings with ``own`` (temperature, review thresholds) over them."""
        settings = {**self.settings, **own}
        return Clinical(float(settings.get("temperature", 1.0)), float(settings.get("review_threshold") or 0.0), settings)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int | None = None


@dataclass(frozen=True)
class Goldens:
    """One stage's golden self-test (runtime/selftest.py): the ``.npz`` of its inputs and
    reference outputs, and the largest difference allowed per precision."""

    file: str
    tolerance: Mapping[str, float]
    reference: str = "fp32"


@dataclass(frozen=True)
class SelfTest:
    seed: int
    stages: Mapping[str, Goldens]


@dataclass(frozen=True)
class EncryptedGraph:
    """How one graph file was encrypted (runtime/crypto.py)."""

    nonce: str  # base64
    plaintext_sha256: str
    plaintext_file: str


@dataclass(frozen=True)
class Encryption:
    algorithm: str
    key_id: str
    source_manifest_sha256: str  # the plain bundle's manifest, bound into each ciphertext
    files: Mapping[str, EncryptedGraph]  # encrypted file name -> record


@dataclass(frozen=True)
class Manifest:
    """A parsed bundle. ``data`` is the raw manifest, kept for writers only (export,
    quantize, build copy it, change it and hand it to :func:`write_manifest`)."""

    root: Path
    model: ModelInfo
    preprocess: PreprocessConfig
    stages: tuple[Stage, ...]
    tiling: Tiling
    memory: MemoryProfile | None
    clinical: Clinical
    files: Mapping[str, FileEntry]
    calibration: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    engines: tuple[Mapping[str, Any], ...] = ()
    selftest: SelfTest | None = None
    encryption: Encryption | None = None
    format_version: int = FORMAT_VERSION
    verified: Mapping[str, str] = field(default_factory=dict)  # file -> sha256 of the bytes checked
    # Graph files whose check waits until a stage opens them (read_manifest(defer_graphs=True)).
    deferred: frozenset[str] = frozenset()
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def precisions(self) -> list[str]:
        """Precisions available for every stage, in PRECISIONS order."""
        common = set.intersection(*(set(s.graphs) for s in self.stages))
        return [p for p in PRECISIONS if p in common]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise BundleError(f"bundle {self.root} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def graph_path(self, stage: Stage, precision: str) -> Path:
        graph = stage.graphs.get(precision)
        if graph is None:
            raise BundleError(
                f"stage {stage.name!r} has no {precision} graph; available: {sorted(stage.graphs)}. "
                f"Fix: run `edgederm quantize {self.root} --precision {precision}` or pick another precision"
            )
        return resolve_inside(self.root, graph.file)

    @property
    def tiled_stage(self) -> Stage | None:
        """The stage run over many tiles (a segmenter fed ``dermoscopy``) or windows
        (``dermoscopy_windows``): the one whose batch the memory plan sizes."""
        for stage in self.stages:
            if "dermoscopy_windows" in stage.sources or (self.model.task == "segment" and "dermoscopy" in stage.sources):
                return stage
        return None

    @property
    def profiled_stage(self) -> Stage:
        """The stage whose batch the memory profile measures: the tiled stage, else the
        first stage fed the dermoscopy image (batch 1 at run time), else the first."""
        tiled = self.tiled_stage
        if tiled is not None:
            return tiled
        return next((s for s in self.stages if "dermoscopy" in s.sources), self.stages[0])

    @property
    def tile_size(self) -> int:
        return self.tiling.tile or self.preprocess.input_size[0]

    @property
    def window_layout(self) -> tuple[int, int, int]:
        """(window, rows, cols) of a windowed model."""
        assert self.tiling.window is not None and self.tiling.grid is not None  # checked by the parser
        return self.tiling.window, self.tiling.grid[0], self.tiling.grid[1]


# --------------------------------------------------------------------------- parsing


def _fail(where: str, found: Any, allowed: str, fix: str = "re-export the bundle with this SDK") -> ManifestError:
    return ManifestError(where, found, allowed, fix)


def _section(data: Mapping[str, Any], key: str, kind: type, required: bool = True) -> Any:
    if key not in data or data[key] is None:
        if required:
            raise _fail(key, "nothing (the key is missing)", f"a {kind.__name__} section")
        return kind()
    value = data[key]
    if not isinstance(value, kind):
        raise _fail(key, value, f"a {'JSON object' if kind is dict else 'JSON list'}")
    return value


def _str(where: str, value: Any, allowed: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value or (allowed is not None and value not in allowed):
        raise _fail(where, value, f"one of {list(allowed)}" if allowed else "a non-empty string")
    return value


def _int(where: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(where, value, f"an integer >= {low}")
    return value


def _number(where: str, value: Any, low: float, high: float, allowed: str, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, value, allowed)
    number = float(value)
    if not math.isfinite(number) or number < low or number > high or (open_low and number == low):
        raise _fail(where, value, allowed)
    return number


def _spec(where: str, raw: Any, is_input: bool) -> TensorSpec:
    if not isinstance(raw, dict):
        raise _fail(where, raw, "a JSON object with name, shape and dtype")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not shape or not all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d) for d in shape):
        raise _fail(f"{where}.shape", shape, "a list of positive ints or axis names, e.g. ['batch', 3, 224, 224]")
    dtype = _str(f"{where}.dtype", raw.get("dtype", "float32"))
    source = _str(f"{where}.source", raw.get("source", "dermoscopy")) if is_input else ""
    return TensorSpec(_str(f"{where}.name", raw.get("name")), tuple(shape), dtype, source)


def _stage(index: int, raw: Any, files: Mapping[str, FileEntry], earlier: list[str], tiling: Tiling) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise _fail(where, raw, "a JSON object with name, inputs, outputs and graphs")
    name = _str(f"{where}.name", raw.get("name"))
    where = f"stages[{index}] ({name!r})"
    specs = {}
    for key in ("inputs", "outputs"):
        items = raw.get(key)
        if not isinstance(items, list) or not items:
            raise _fail(f"{where}.{key}", items, "a non-empty list of tensor specs")
        specs[key] = tuple(_spec(f"{where}.{key}[{i}]", s, key == "inputs") for i, s in enumerate(items))
    for spec in specs["inputs"]:
        source = spec.source
        if source not in IMAGE_SOURCES + OTHER_SOURCES and not ("." in source and source.split(".", 1)[0] in earlier):
            raise _fail(f"{where}.inputs {spec.name!r}.source", source,
                        f"one of {', '.join(IMAGE_SOURCES + OTHER_SOURCES)} or '<earlier stage>.<output>' "
                        f"(earlier stages: {earlier or 'none'})")
        if source == "dermoscopy_windows" and (tiling.window is None or tiling.grid is None):
            raise _fail("tiling", "no 'window' and 'grid'", f"a window size and grid: stage {name!r} takes windows")
    graphs_raw = raw.get("graphs")
    if not isinstance(graphs_raw, dict) or "fp32" not in graphs_raw:
        raise _fail(f"{where}.graphs", graphs_raw, "a JSON object with at least an 'fp32' graph {file, sha256}")
    graphs = {}
    for precision, graph in graphs_raw.items():
        gwhere = f"{where}.graphs.{precision}"
        _str(gwhere, precision, PRECISIONS)
        if not isinstance(graph, dict):
            raise _fail(gwhere, graph, "a JSON object {file, sha256}")
        file = _str(f"{gwhere}.file", graph.get("file"))
        sha = graph.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise _fail(f"{gwhere}.sha256", sha, "the graph's 64-hex-digit sha256")
        if file not in files:
            raise BundleIntegrityError(f"stage {name!r} {precision} graph {file!r} is not in the manifest's file table")
        if files[file].sha256 != sha:
            raise BundleIntegrityError(f"stage {name!r} {precision} graph {file!r}: sha256 {sha} differs from the file "
                                       f"table's {files[file].sha256}; re-export the bundle")
        graphs[precision] = GraphFile(file, sha, _quantized_on(f"{gwhere}.cpu", graph.get("cpu")))
    return Stage(name, specs["inputs"], specs["outputs"], graphs)


def _quantized_on(where: str, raw: Any) -> QuantizedOn | None:
    if raw is None:
        return None
    made_on = raw.get("made_on") if isinstance(raw, dict) else None
    if not isinstance(made_on, dict) or not isinstance(raw.get("saturation_free"), bool):
        raise _fail(where, raw, "{made_on: {class, arch, features}, made_for, saturation_free, form}",
                    "quantize the bundle again with this SDK")
    features = made_on.get("features") or []
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise _fail(f"{where}.made_on.features", features, "a list of CPU feature names")
    return QuantizedOn(_str(f"{where}.made_on.class", made_on.get("class"), KERNEL_CLASSES),
                       _str(f"{where}.made_for", raw.get("made_for"), KERNEL_CLASSES), raw["saturation_free"],
                       str(made_on.get("arch") or ""), tuple(features), str(raw.get("form") or ""))


def _tiling(raw: Any) -> Tiling:
    if raw is None:
        return Tiling()
    if not isinstance(raw, dict):
        raise _fail("tiling", raw, "a JSON object or null")
    grid = raw.get("grid")
    if grid is not None and (not isinstance(grid, list) or len(grid) != 2):
        raise _fail("tiling.grid", grid, "[rows, cols] of positive ints")
    optional = {k: (_int(f"tiling.{k}", raw[k]) if raw.get(k) is not None else None)
                for k in ("tile", "window", "working_max_side")}
    return Tiling(
        overlap=_number("tiling.overlap", raw.get("overlap", DEFAULT_OVERLAP), 0.0, 0.95, "a number in [0, 0.95]"),
        blend=_str("tiling.blend", raw.get("blend", DEFAULT_BLEND), BLENDS),
        batch_size=_int("tiling.batch_size", raw.get("batch_size", DEFAULT_TILE_BATCH)),
        grid=(_int("tiling.grid[0]", grid[0]), _int("tiling.grid[1]", grid[1])) if grid is not None else None,
        **optional,
    )


def _memory(raw: Any) -> MemoryProfile | None:
    if raw is None:
        return None
    fix = "re-export the bundle (edgederm export) to measure it again"
    if not isinstance(raw, dict):
        raise ManifestError("memory", raw, "a JSON object with fixed_bytes and per_tile_bytes, or null", fix)
    fixed, slope = (_int(f"memory.{key}", raw.get(key)) for key in ("fixed_bytes", "per_tile_bytes"))
    measured = raw.get("measured_on") or {}
    return MemoryProfile(fixed, slope, dict(measured) if isinstance(measured, dict) else {}, str(raw.get("stage", "")))


def _clinical(raw: Any) -> Clinical:
    if raw is None:
        return Clinical()
    if not isinstance(raw, dict):
        raise _fail("clinical", raw, "a JSON object")
    temperature = _number("clinical.temperature", raw.get("temperature", 1.0), 0.0, math.inf,
                          "a finite number > 0 (1.0 leaves the logits as they are)", open_low=True)
    for key in ("review_threshold", "malignant_threshold", "review_class_min_probability"):
        if raw.get(key) is not None:
            _number(f"clinical.{key}", raw[key], 0.0, 1.0, "a probability in [0, 1]")
    per_precision = raw.get("precisions")
    if per_precision is not None:
        if not isinstance(per_precision, dict):
            raise _fail("clinical.precisions", per_precision, "a JSON object: precision -> refitted settings")
        for precision, own in per_precision.items():
            where = f"clinical.precisions.{precision}"
            _str(where, precision, PRECISIONS)
            if not isinstance(own, dict) or not set(own) <= {"temperature", "review_threshold", "malignant_threshold"}:
                raise _fail(where, own, "a JSON object with temperature, review_threshold, malignant_threshold")
            if own.get("temperature") is not None:
                _number(f"{where}.temperature", own["temperature"], 0.0, math.inf, "a finite number > 0", open_low=True)
            for key in ("review_threshold", "malignant_threshold"):
                if own.get(key) is not None:
                    _number(f"{where}.{key}", own[key], 0.0, 1.0, "a probability in [0, 1]")
    for key in ("review_classes", "malignant_classes"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise _fail(f"clinical.{key}", value, "a list of class names")
    threshold = float(raw.get("review_threshold") or 0.0)
    return Clinical(temperature, threshold, dict(raw))


def _sha(where: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64:
        raise _fail(where, value, "a 64-hex-digit sha256")
    return value


def _selftest(raw: Any, files: Mapping[str, FileEntry], stages: Sequence[Stage]) -> SelfTest | None:
    if raw is None:
        return None
    fix = "run `edgederm selftest add BUNDLE` again"
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict):
        raise ManifestError("selftest", raw, "a JSON object {seed, stages: {stage: {file, tolerance}}} or null", fix)
    goldens = {}
    for name, entry in raw["stages"].items():
        where = f"selftest.stages[{name!r}]"
        if name not in {s.name for s in stages}:
            raise ManifestError(where, name, f"one of the bundle's stages {[s.name for s in stages]}", fix)
        if not isinstance(entry, dict) or not isinstance(entry.get("tolerance"), dict):
            raise ManifestError(where, entry, "a JSON object {file, tolerance: {precision: number}}", fix)
        file = _str(f"{where}.file", entry.get("file"))
        if file not in files:
            raise BundleIntegrityError(f"goldens {file!r} of stage {name!r} are not in the manifest's file table "
                                       "(unverified); run `edgederm selftest add` again")
        tolerance = {_str(f"{where}.tolerance", p, PRECISIONS): _number(f"{where}.tolerance.{p}", t, 0.0, math.inf,
                                                                         "a finite number >= 0")
                     for p, t in entry["tolerance"].items()}
        goldens[name] = Goldens(file, tolerance, _str(f"{where}.reference", entry.get("reference", "fp32"), PRECISIONS))
    return SelfTest(_int("selftest.seed", raw.get("seed", 0), 0), goldens)


def _encryption(raw: Any, files: Mapping[str, FileEntry], stages: Sequence[Stage]) -> Encryption | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
        raise _fail("encryption", raw, "a JSON object {algorithm, key_id, source_manifest_sha256, files} or null",
                    "encrypt the plain bundle again (edgederm encrypt)")
    records = {}
    for name, record in raw["files"].items():
        where = f"encryption.files[{name!r}]"
        if name not in files:
            raise BundleIntegrityError(f"encrypted graph {name!r} is not in the manifest's file table")
        if not isinstance(record, dict):
            raise _fail(where, record, "a JSON object {nonce, plaintext_sha256, plaintext_file}")
        records[name] = EncryptedGraph(_str(f"{where}.nonce", record.get("nonce")),
                                       _sha(f"{where}.plaintext_sha256", record.get("plaintext_sha256")),
                                       _str(f"{where}.plaintext_file", record.get("plaintext_file")))
    for stage in stages:
        for graph in stage.graphs.values():
            if graph.file not in records:
                raise BundleIntegrityError(f"bundle is encrypted but graph {graph.file!r} has no encryption record; "
                                           "re-encrypt the plain bundle")
    return Encryption(_str("encryption.algorithm", raw.get("algorithm")), _str("encryption.key_id", raw.get("key_id")),
                      _sha("encryption.source_manifest_sha256", raw.get("source_manifest_sha256")), records)


def _model(raw: dict[str, Any]) -> ModelInfo:
    names = raw.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _fail("model.class_names", names, "a non-empty list of class names")
    modalities = raw.get("modalities", ["dermoscopy"])
    if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
        raise _fail("model.modalities", modalities, "a non-empty list such as ['dermoscopy', 'metadata']")
    size = raw.get("input_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2):
        raise _fail("model.input_size", size, "[height, width]")
    return ModelInfo(
        name=str(raw.get("name", "")), task=_str("model.task", raw.get("task"), TASKS), class_names=tuple(names),
        modalities=tuple(modalities), metadata_schema=raw.get("metadata_schema"),
        input_size=(_int("model.input_size[0]", size[0]), _int("model.input_size[1]", size[1])) if size else None,
        architecture=str(raw.get("architecture", "")),
    )


def _check_classes(model: ModelInfo, stages: tuple[Stage, ...]) -> None:
    """A classifier's class names must match the width of its output stage's logits."""
    if model.task != "classify":
        return
    output = stages[-1].outputs[0]
    width = output.shape[-1]
    if isinstance(width, int) and width != len(model.class_names):
        raise _fail("model.class_names", list(model.class_names),
                    f"{width} names, one per output of stage {stages[-1].name!r} ({output.name} has shape "
                    f"{list(output.shape)})")


def parse_manifest(data: Any, root: Path) -> Manifest:
    """Check and type a manifest's JSON (files are not read; see :func:`read_manifest`)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _fail("format", found, f"{FORMAT!r} (not an EdgeDerm manifest?)")
    version = data.get("format_version", FORMAT_VERSION)
    _int("format_version", version)
    if version > FORMAT_VERSION:
        raise ManifestError("format_version", version, f"at most {FORMAT_VERSION} (this SDK's format)",
                            "upgrade edgederm to read it")
    files_raw = _section(data, "files", dict)
    files = {}
    for name, entry in files_raw.items():
        resolve_inside(root, name)  # a name that leaves the bundle is refused before anything else
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            raise _fail(f"files[{name!r}]", entry, "{'sha256': <64 hex digits>, 'bytes': <int>}")
        size = entry.get("bytes")
        files[name] = FileEntry(entry["sha256"], _int(f"files[{name!r}].bytes", size, 0) if size is not None else None)
    model = _model(_section(data, "model", dict))
    try:
        preprocess = PreprocessConfig.from_dict(_section(data, "preprocess", dict, required=False))
    except InputError as exc:
        raise ManifestError("preprocess", data.get("preprocess"), str(exc), "re-export the bundle") from exc
    tiling = _tiling(data.get("tiling"))
    stages_raw = _section(data, "stages", list)
    if not stages_raw:
        raise _fail("stages", stages_raw, "a non-empty list of stages")
    stages: list[Stage] = []
    for index, raw in enumerate(stages_raw):
        stages.append(_stage(index, raw, files, [s.name for s in stages], tiling))
    if model.task == "segment" and (len(stages) != 1 or stages[0].sources != ("dermoscopy",)):
        raise _fail("stages", [(s.name, list(s.sources)) for s in stages],
                    "one stage with one 'dermoscopy' input for a segmentation bundle")
    _check_classes(model, tuple(stages))
    memory = _memory(data.get("memory"))
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise _fail("calibration", calibration, "a JSON object per precision or null")
    engines = data.get("engines") or []
    if not isinstance(engines, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("stage", "precision", "file"))
            for e in engines):
        raise _fail("engines", engines, "a list of {stage, precision, file, target, ...} entries (edgederm build)")
    return Manifest(root=root, model=model, preprocess=preprocess, stages=tuple(stages), tiling=tiling,
                    memory=memory, clinical=_clinical(data.get("clinical")), files=files,
                    calibration={k: v for k, v in calibration.items() if isinstance(v, dict)},
                    engines=tuple(engines), selftest=_selftest(data.get("selftest"), files, stages),
                    encryption=_encryption(data.get("encryption"), files, stages), format_version=version, data=data)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(read_regular_file(path, MAX_MANIFEST_BYTES, _refuse_manifest(path)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    except RecursionError as exc:
        raise ManifestError(MANIFEST, "JSON nested deeper than Python can parse", "a manifest written by export") from exc


def check_file(root: Path, name: str, expected: str) -> str:
    """The sha256 of bundle file ``name``, refused (BundleIntegrityError) unless it is ``expected``."""
    file_path = resolve_inside(root, name)
    if not file_path.is_file():
        raise BundleIntegrityError(f"bundle file {name!r} is missing from {root}")
    actual = sha256_file(file_path)
    if actual != expected:
        raise BundleIntegrityError(
            f"bundle file {name!r} does not match its manifest sha256 (expected {expected}, "
            f"got {actual}): the file was changed or corrupted; re-export or re-copy the bundle"
        )
    return actual


def verified_graph(manifest: Manifest, name: str) -> str | None:
    """The checked sha256 of graph file ``name``: checked now if its check was deferred
    (None when the manifest was read without verification)."""
    if name in manifest.verified:
        return manifest.verified[name]
    if name not in manifest.deferred:
        return None
    digest = check_file(manifest.root, name, manifest.files[name].sha256)
    manifest.verified[name] = digest  # type: ignore[index]  # the dict read_manifest made
    return digest


def read_manifest(bundle: str | os.PathLike[str], verify: bool = True, defer_graphs: bool = False) -> Manifest:
    """Parse ``manifest.json`` and (by default) verify every listed file's sha256.

    ``defer_graphs``: stage graphs are checked when a stage opens them
    (:func:`verified_graph`), not here: a bundle holding fp32, int8 and int8_dynamic
    graphs of a paper-size model is ~0.5 GB, of which a load runs one precision. Every
    other file is checked here; every graph is still checked before it runs.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is not a directory; expected a folder written by `edgederm export`")
    path = root / MANIFEST
    if not os.path.lexists(path):
        raise BundleError(f"{str(root)!r} has no {MANIFEST}: not a bundle, or an export that did not finish")
    manifest = parse_manifest(_load_json(path), root)
    if not verify:
        return manifest
    graphs = {g.file for stage in manifest.stages for g in stage.graphs.values()} if defer_graphs else set()
    verified: dict[str, str] = {}
    for name, entry in manifest.files.items():
        if name in graphs:
            if not resolve_inside(root, name).is_file():
                raise BundleIntegrityError(f"bundle file {name!r} is missing from {root}")
            continue
        verified[name] = check_file(root, name, entry.sha256)
    return dataclasses.replace(manifest, verified=verified, deferred=frozenset(graphs & set(manifest.files)))
