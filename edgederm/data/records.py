"""What every layout reader returns: a :class:`Dataset` of :class:`Record` s."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from edgederm.runtime.errors import InputError
from edgederm.runtime.metadata import MetadataSchema, load_schema

SchemaLike = Union[str, os.PathLike, Mapping[str, Any], MetadataSchema, None]


def resolve_schema(schema: SchemaLike, default: str | None) -> MetadataSchema | None:
    """``schema`` as a MetadataSchema; None takes ``default`` (a bundled name, or no schema)."""
    if schema is None:
        return load_schema(default) if default else None
    return load_schema(schema if not isinstance(schema, os.PathLike) else os.fspath(schema))


@dataclass(frozen=True)
class Record:
    """One image of a dataset."""

    id: str
    image: Path
    label: int | None  # index into class_names; None when the layout has no diagnosis (segmentation)
    class_names: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # raw values; None = missing
    mask: Path | None = None  # lesion mask (0/255), same size as the image
    clinical: Path | None = None  # clinical (close-up) photograph of the same lesion, when the dataset has one
    group: str | None = None  # lesion or patient id: keep one group in one split
    split: str | None = None  # the dataset's own split ("train" / "valid" / "test"), when it ships one

    @property
    def class_name(self) -> str | None:
        return None if self.label is None else self.class_names[self.label]


@dataclass
class Dataset(Sequence[Record]):
    """Records of one layout, with the class names and metadata schema they share."""

    layout: str
    root: Path
    records: list[Record]
    class_names: tuple[str, ...]
    schema: MetadataSchema | None = None
    notes: list[str] = field(default_factory=list)  # decisions taken while reading (dropped columns, ...)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: Any) -> Any:  # an int gives a Record, a slice a Dataset
        if isinstance(index, slice):
            return replace(self, records=self.records[index])
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def labels(self) -> np.ndarray:
        """Label indices (int64); -1 for records without a diagnosis."""
        return np.array([-1 if r.label is None else r.label for r in self.records], np.int64)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts)}

    def metadata_matrix(self, schema: SchemaLike = None) -> np.ndarray:
        """Metadata of every record encoded by ``schema`` (default: the dataset's)."""
        chosen = resolve_schema(schema, None) if schema is not None else self.schema
        if chosen is None:
            raise InputError(f"dataset {self.root} ({self.layout}) was read without a metadata schema; "
                             "pass schema=<name or JSON file> to read_dataset or to metadata_matrix")
        return chosen.encode_many([chosen.select(r.metadata) for r in self.records])

    def summary(self) -> str:
        """One line for a person: layout, size, classes, masks, metadata."""
        counts = ", ".join(f"{name} {n}" for name, n in self.class_counts().items()) if self.class_names else "no labels"
        masks = sum(r.mask is not None for r in self.records)
        meta = f"metadata {self.schema.name} (dim {self.schema.dim})" if self.schema else "no metadata schema"
        return (f"{self.layout}: {len(self)} images; classes: {counts}; "
                f"{masks} masks; {meta}" + (f"; notes: {'; '.join(self.notes)}" if self.notes else ""))


def check_unique_ids(dataset: Dataset) -> None:
    seen: set[str] = set()
    for record in dataset.records:
        if record.id in seen:
            raise InputError(f"{dataset.root}: image id {record.id!r} occurs twice; every image needs its own row")
        seen.add(record.id)


def reorder_classes(dataset: Dataset, classes: Sequence[str]) -> Dataset:
    """``dataset`` with its labels re-indexed to the class order ``classes``."""
    wanted = [str(c) for c in classes]
    unknown = sorted({r.class_name for r in dataset.records if r.class_name is not None} - set(wanted))
    if unknown:
        raise InputError(f"classes={wanted} lacks {unknown}, which the {dataset.layout} data at {dataset.root} has; "
                         "add them to classes")
    names = tuple(wanted)
    records = [replace(r, label=None if r.label is None else names.index(r.class_names[r.label]), class_names=names)
               for r in dataset.records]
    return replace(dataset, records=records, class_names=names)
