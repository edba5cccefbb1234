"""Patient metadata -> the fixed-length float vector a model takes, from a schema file.

Encodings are data, not code: a schema (JSON) lists the fields. A categorical field
is one-hot over its categories plus one slot for "missing"; a numeric field is two
values, the value scaled to [0, 1] by its range and a missing flag. A missing or
None value is its own category, never a crash; an unknown category is an error that
names the field and the allowed values. The bundled schemas ship inside this package
(``edgederm/runtime/schemas``, read from the files next to this module: the runtime runs on
Python 3.8, which lacks ``importlib.resources.files``) and travel inside the bundle's manifest, so the device encodes
exactly as training did.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def is_non_finite_number(value: object) -> bool:
    """True for a NaN or infinite number of any kind: Python, numpy scalar (float16..longdouble,
    complex), 0-d array, Decimal. ``np.float32`` is not a ``float``, so an isinstance test
    on ``float`` alone lets its NaN through."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        return False
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "fc":
            return False
        value = value[()]
    if not isinstance(value, (numbers.Number, np.generic)):
        return False
    try:
        number = complex(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False
    return not (math.isfinite(number.real) and math.isfinite(number.imag))


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a caller's megabyte string stays out of messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class MetadataSchema:
    name: str
    fields: tuple[dict[str, Any], ...]

    @property
    def dim(self) -> int:
        return sum(len(f["categories"]) + 1 if f["type"] == "categorical" else 2 for f in self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fields": [dict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetadataSchema":
        fields = []
        for f in data.get("fields", []):
            kind = f.get("type")
            if kind == "categorical":
                if not f.get("categories"):
                    raise InputError(f"schema field {f.get('name')!r} is categorical but lists no categories")
            elif kind == "numeric":
                if not f.get("max", 1) > f.get("min", 0):
                    raise InputError(f"schema field {f.get('name')!r}: max must exceed min")
            else:
                raise InputError(f"schema field {f.get('name')!r} has type {kind!r}; expected 'categorical' or 'numeric'")
            fields.append(dict(f))
        return cls(str(data.get("name", "custom")), tuple(fields))

    def encode(self, metadata: Mapping[str, Any] | None) -> np.ndarray:
        """One record -> float32 vector of length ``dim``."""
        metadata = dict(metadata or {})
        known = {f["name"] for f in self.fields}
        unknown = set(metadata) - known
        if unknown:
            names = sorted(shown(k) for k in unknown)
            raise InputError(f"metadata fields {', '.join(names[:10])}{' ...' if len(names) > 10 else ''} are not in "
                             f"schema {self.name!r}; expected some of {sorted(known)}")
        out: list[float] = []
        for f in self.fields:
            value = metadata.get(f["name"])
            # NaN is how tables (pandas, CSV readers) write "unknown"; any NaN, not only float's.
            missing = value is None or (isinstance(value, str) and value == "") or (
                is_non_finite_number(value) and _is_nan(value))
            if f["type"] == "categorical":
                categories = [str(c) for c in f["categories"]]
                slots = [0.0] * (len(categories) + 1)
                if missing:
                    slots[-1] = 1.0
                else:
                    key = str(value).strip().lower()
                    lowered = [c.lower() for c in categories]
                    if not isinstance(value, (str, numbers.Number, np.generic)) or key not in lowered:
                        raise InputError(
                            f"metadata field {f['name']!r} has value {shown(value)}; allowed: {categories} "
                            "(or leave it out / None when unknown)"
                        )
                    slots[lowered.index(key)] = 1.0
                out += slots
            else:
                if missing or value is None:
                    out += [0.0, 1.0]
                    continue
                try:
                    if isinstance(value, bytes) or (isinstance(value, np.ndarray) and value.ndim):
                        raise TypeError  # float() would read b"5" and a one-element array as numbers
                    number = float(value)
                except (TypeError, ValueError, OverflowError):
                    raise InputError(f"metadata field {f['name']!r} must be a number; got {shown(value)} "
                                     f"({type(value).__name__})") from None
                if not math.isfinite(number):
                    raise InputError(f"metadata field {f['name']!r} is {number}; expected a finite number or None")
                lo, hi = float(f.get("min", 0.0)), float(f.get("max", 1.0))
                out += [min(max((number - lo) / (hi - lo), 0.0), 1.0), 0.0]
        return np.asarray(out, np.float32)

    def select(self, record: Mapping[str, Any] | None) -> dict[str, Any]:
        """``record`` without the fields this schema does not use (dataset tables carry
        more columns than a model reads; :meth:`encode` refuses unknown fields)."""
        known = {f["name"] for f in self.fields}
        return {k: v for k, v in (record or {}).items() if k in known}

    def encode_many(self, records: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
        return np.stack([self.encode(r) for r in records]) if records else np.zeros((0, self.dim), np.float32)


def _is_nan(value: Any) -> bool:
    try:
        number = complex(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isnan(number.real) or math.isnan(number.imag)


def load_schema(schema: str | Mapping[str, Any] | MetadataSchema) -> MetadataSchema:
    """A schema object, a dict, a JSON file path, or the name of a bundled schema."""
    if isinstance(schema, MetadataSchema):
        return schema
    if isinstance(schema, Mapping):
        return MetadataSchema.from_dict(schema)
    path = Path(schema)
    if path.is_file():
        return MetadataSchema.from_dict(json.loads(path.read_text()))
    bundled = bundled_schemas()
    if str(schema) not in bundled:
        raise InputError(f"metadata schema {schema!r} is neither a file nor a bundled schema; bundled: {bundled}")
    return MetadataSchema.from_dict(json.loads((SCHEMAS / f"{schema}.json").read_text()))


def bundled_schemas() -> list[str]:
    """Names of the schemas that ship with the runtime (``load_schema(name)`` reads them)."""
    return sorted(p.name[:-len(".json")] for p in SCHEMAS.iterdir() if p.name.endswith(".json"))
