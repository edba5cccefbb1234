"""What several layout readers share: finding their table, checking columns, metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import edgederm.data.files as files
from edgederm.data.layouts.registry import LAYOUTS
from edgederm.runtime.errors import InputError
from edgederm.runtime.metadata import MetadataSchema

# How many folder levels below the given root a layout's marker file may sit: the
# archives extract into a folder or two of their own (release_v0/meta/meta.csv).
MARKER_DEPTH = 3


def find_markers(root: Path, predicate: Callable[[str], bool]) -> list[Path]:
    """Files named like a layout's marker, at most MARKER_DEPTH folder levels down."""
    return files.find_files(root, predicate, MARKER_DEPTH)


def one_file(found: list[Path], root: Path, what: str, layout: str) -> Path:
    if not found:
        raise InputError(f"no {what} in {root} or {MARKER_DEPTH} folder levels below (it holds "
                         f"{files.describe_folder(root)}); the {layout} layout expects {LAYOUTS[layout]}")
    if len(found) > 1:
        raise InputError(f"{root} holds several {what}: {[str(p.relative_to(root)) for p in found]}; "
                         "pass the folder (or CSV file) of the one you mean")
    return found[0]


def require_columns(path: Path, header: Sequence[str], needed: Sequence[str], layout: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(f"{path} has no column(s) {missing} (columns: {list(header)}); the {layout} layout expects "
                         f"{LAYOUTS[layout]}")


def missing_images_error(missing: list[str], source: Path, search_root: Path, layout: str) -> InputError:
    return InputError(f"{source} lists {len(missing)} image(s) that are not below {search_root} (e.g. {missing[:3]}); "
                      f"the {layout} layout expects {LAYOUTS[layout]}. Fix: extract the image archive(s) next to "
                      "the CSV, or point at the folder that holds both")


class MetadataReader:
    """Picks and validates the metadata of each row of one table."""

    def __init__(self, source: Path, available: Sequence[str], schema: MetadataSchema | None,
                 leaks: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.schema = schema
        leaks = leaks or {}
        if schema is None:
            # No schema: every non-leaking column, raw strings, validated by nobody.
            self.fields = [c for c in available if c not in leaks]
            self.numeric: set[str] = set()
            return
        names = [f["name"] for f in schema.fields]
        leaking = [n for n in names if n in leaks]
        if leaking:
            raise InputError(f"metadata schema {schema.name!r} asks for {leaking[0]!r}, which is {leaks[leaking[0]]}: "
                             f"it leaks the diagnosis into the model's input; remove it from the schema")
        absent = [n for n in names if n not in available]
        if absent:
            raise InputError(f"metadata schema {schema.name!r} needs field(s) {absent} but {source} provides "
                             f"{list(available) or 'no metadata'}; use a schema with those fields only")
        self.fields = names
        self.numeric = {f["name"] for f in schema.fields if f["type"] == "numeric"}

    def __call__(self, row: Mapping[str, str | None], where: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.fields:
            text = row.get(name)
            text = None if text is None or str(text).strip() == "" else str(text).strip()
            if text is not None and name in self.numeric:
                try:
                    values[name] = float(text)
                except ValueError:
                    raise InputError(f"{self.source} {where}: metadata field {name!r} must be a number; "
                                     f"got {text!r}") from None
            else:
                values[name] = text
        if self.schema is not None:
            try:
                self.schema.encode(values)
            except InputError as exc:
                raise InputError(f"{self.source} {where}: {exc}") from None
        return values


def refuse_schema(root: Path, schema: MetadataSchema | None) -> None:
    """Layouts without metadata: a schema cannot be filled, say so."""
    if schema is not None:
        MetadataReader(root, [], schema)  # raises: needs field(s) ... but provides no metadata


def diagnosis_labels(table: Path, rows: Sequence[Mapping[str, str]], column: str, id_column: str,
                     classes: Sequence[str], normalise: Callable[[str], str]) -> list[int]:
    """The class index of each row's diagnosis cell; an unknown diagnosis names its line."""
    labels = []
    for line, row in enumerate(rows, start=2):
        value = normalise(row[column])
        if value not in classes:
            raise InputError(f"{table} line {line} (image {row[id_column]!r}): {column} {row[column]!r} is not one of "
                             f"{list(classes)}")
        labels.append(list(classes).index(value))
    return labels


def indexed_images(table: Path, rows: Sequence[Mapping[str, str]], id_column: str, index: files.ImageIndex,
                   layout: str) -> list[Path]:
    """Each row's image, found by id below the index's folder; any missing one is an error."""
    found = [index.find(row[id_column]) for row in rows]
    missing = [row[id_column] for row, image in zip(rows, found) if image is None]
    if missing:
        raise missing_images_error(missing, table, index.root, layout)
    return [image for image in found if image is not None]
