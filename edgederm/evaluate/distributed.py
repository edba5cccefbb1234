"""``evaluate --ray ADDRESS``: the same cases on a Ray cluster, with Ray Data.

For archives that outgrow one machine. The records go to the cluster as plain rows
(paths, label, metadata as JSON); each Ray actor loads the bundle once and runs
:func:`edgederm.evaluate.case.evaluate_case`, the code a local run uses; the rows
come back to the driver, which appends them to the same results file. So resume, the
file format and every number are shared with a single-process run: only where the
cases are predicted changes. The image paths must be readable on every node (a
shared file system).

``ADDRESS`` is what ``ray.init`` takes: ``auto`` or ``ray://host:10001`` for a running
cluster, ``local`` for a Ray instance started on this machine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgederm.data import Record
from edgederm.runtime.optional import optional_import

#: Cases per Ray Data batch: small, so a slow image does not hold many others back.
BATCH = 8


def _as_row(record: Record) -> dict[str, Any]:
    return {"id": record.id, "image": str(record.image), "label": -1 if record.label is None else record.label,
            "class_names": json.dumps(list(record.class_names)), "metadata": json.dumps(record.metadata),
            "mask": str(record.mask) if record.mask else "", "clinical": str(record.clinical) if record.clinical else ""}


def _as_record(row: dict[str, Any]) -> Record:
    label = int(row["label"])
    return Record(str(row["id"]), Path(row["image"]), None if label < 0 else label,
                  tuple(json.loads(row["class_names"])), json.loads(row["metadata"]),
                  mask=Path(row["mask"]) if row["mask"] else None,
                  clinical=Path(row["clinical"]) if row["clinical"] else None)


class _Predictor:
    """One per Ray actor: the bundle loaded once, cases predicted batch by batch."""

    def __init__(self, bundle: str, precision: str, backend: str, skin: bool) -> None:
        from edgederm.runtime import load

        self.model = load(bundle, backend=backend, precision=precision, threads=1)
        self.skin = skin

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from edgederm.evaluate.case import evaluate_case

        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["id"]))]
        results = [json.dumps(evaluate_case(self.model, _as_record(row), self.skin)) for row in rows]
        return {"row": np.array(results, dtype=object)}


def connect(address: str) -> Any:
    ray = optional_import("ray", "evaluate --ray")
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def run_on_ray(address: str, bundle: str, precision: str, backend: str, records: Sequence[Record], workers: int,
               skin: bool) -> Iterator[dict[str, Any]]:
    """The rows of ``records`` predicted by ``workers`` Ray actors (completion order)."""
    if not records:
        return
    ray = connect(address)
    dataset = ray.data.from_items([_as_row(r) for r in records])
    predicted = dataset.map_batches(_Predictor, fn_constructor_args=(str(Path(bundle).resolve()), precision, backend, skin),
                                    concurrency=max(1, workers), batch_size=BATCH, batch_format="numpy", num_cpus=1)
    for batch in predicted.iter_batches(batch_size=BATCH, batch_format="numpy"):
        for row in batch["row"]:
            yield json.loads(row)
