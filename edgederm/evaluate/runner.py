"""Run a bundle through the runtime on a labelled dataset, case by case, resumably.

The cases go through ``DeployedModel.predict_file``: decoding, size checks, tiling,
temperature and the review rules are the device's own code, never a re-implementation.

Decisions:

* Streaming: records are read as a list of paths (a few hundred bytes each) and
  images are decoded one at a time in the worker that predicts them; what is kept is
  one small JSON row per case (probabilities, review reasons, subgroup values,
  per-image segmentation figures), never an image or a mask.
* Resumable: every finished case is appended to ``<dir>/cases/<precision>.jsonl`` as
  one line with a single ``write`` on a file opened in append mode, so a killed run
  leaves whole lines (a torn last line is cut off on resume). The file's first line
  names the bundle (sha256 of its manifest, which holds every file's hash), the data
  and the precision; a resume against anything else is refused.
* ``workers > 1`` starts that many processes (spawned: no onnxruntime thread pool is
  forked), each loading the bundle once with ``cpu_count // workers`` threads; at most
  four cases per worker are in flight, so memory does not grow with the dataset.
* A case the runtime refuses (an unreadable image, say) is recorded with its error,
  left out of the metrics and counted in the report.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


from edgederm.data import Dataset, Record, read_dataset
from edgederm.data.labelled import stderr_progress
from edgederm.runtime import load
from edgederm.runtime.errors import InputError

from .case import SKIN_TONE, evaluate_case

log = logging.getLogger(__name__)



@dataclass
class EvaluateOptions:
    precisions: Sequence[str] | None = None  # None: every precision the bundle has
    by: Sequence[str] = ()  # metadata fields, and/or "skin_tone"
    workers: int = 1
    malignant: Sequence[str] | None = None  # None: the bundle's malignant classes
    n_boot: int = 1000
    seed: int = 0
    layout: str = "auto"
    backend: str = "auto"
    progress: bool | Callable[[str, int, int], None] = False
    limit: int | None = None  # evaluate the first N records only (smoke runs)
    ray: str | None = None  # a Ray address: predict on that cluster (edgederm/evaluate/distributed.py)


def bundle_precisions(model: Any) -> list[str]:
    """Precisions every stage of a loaded bundle has a graph for, fp32 first."""
    return list(model.manifest.precisions())


def manifest_sha256(bundle: str | os.PathLike[str]) -> str:
    from edgederm.runtime.bundle import MANIFEST, sha256_file

    return sha256_file(Path(bundle) / MANIFEST)


# --------------------------------------------------------------------------- one case

_WORKER: dict[str, Any] = {}


def _open_model(bundle: str, precision: str, backend: str, threads: int | None) -> Any:
    return load(bundle, backend=backend, precision=precision, threads=threads)


def _worker_init(bundle: str, precision: str, backend: str, threads: int | None, skin: bool) -> None:
    _WORKER.update(model=_open_model(bundle, precision, backend, threads), skin=skin)


def _worker_case(record: Record) -> dict[str, Any]:
    return evaluate_case(_WORKER["model"], record, skin=_WORKER["skin"])


# --------------------------------------------------------------------------- results file

class CaseFile:
    """``cases/<precision>.jsonl``: a header line, then one row per finished case."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = header
        self.rows: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._resume()
        else:
            self._append(header)

    def _resume(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a kill: cut it off, its case runs again
            with open(self.path, "r+b") as f:
                f.truncate(end)
        lines = data[:end].splitlines()
        found = json.loads(lines[0]) if lines else None
        if found != self.header:
            raise InputError(
                f"{self.path} holds results of another evaluation ({found}); this one is {self.header}. "
                "Fix: pass another --report folder, or delete that file to start over")
        for line in lines[1:]:
            row = json.loads(line)
            self.rows[row["id"]] = row

    def _append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write in append mode: the line lands whole or not at all
        finally:
            os.close(fd)

    def add(self, row: dict[str, Any]) -> None:
        self._append(row)
        self.rows[row["id"]] = row


def _run_cases(bundle: str, precision: str, backend: str, records: Sequence[Record], workers: int,
               skin: bool) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        model = _open_model(bundle, precision, backend, None)
        for record in records:
            yield evaluate_case(model, record, skin)
        return
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(bundle, precision, backend, threads, skin)) as pool:
        pending: set[Future[dict[str, Any]]] = set()
        todo = iter(records)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 4 * workers:
                record = next(todo, None)
                if record is None:
                    exhausted = True
                else:
                    pending.add(pool.submit(_worker_case, record))
            if pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()


def run_precision(bundle: str, precision: str, dataset: Dataset | Sequence[Record], folder: Path,
                  options: EvaluateOptions, data_id: str) -> list[dict[str, Any]]:
    """Every record at ``precision``, resuming ``folder/cases/<precision>.jsonl``; the rows in record order."""
    records = list(dataset)
    skin = SKIN_TONE in options.by
    header = {"bundle_manifest_sha256": manifest_sha256(bundle), "precision": precision, "data": data_id,
              "backend": options.backend, "skin_tone": skin}
    cases = CaseFile(folder / "cases" / f"{precision}.jsonl", header)
    remaining = [r for r in records if r.id not in cases.rows]
    if cases.rows:
        log.info("%s: resuming, %d of %d cases already done", precision, len(records) - len(remaining), len(records))
    report = _progress(options.progress, f"evaluating {precision}")
    done = len(records) - len(remaining)
    if options.ray:
        from edgederm.evaluate.distributed import run_on_ray

        rows = run_on_ray(options.ray, bundle, precision, options.backend, remaining, options.workers, skin)
    else:
        rows = _run_cases(bundle, precision, options.backend, remaining, options.workers, skin)
    for row in rows:
        cases.add(row)
        done += 1
        if report:
            report(done, len(records))
    return [cases.rows[r.id] for r in records]


def _progress(progress: bool | Callable[[str, int, int], None], what: str) -> Callable[[int, int], None] | None:
    if progress is True:
        return stderr_progress(what)
    if callable(progress):
        return lambda done, total: progress(what, done, total)
    return None


def dataset_id(dataset: Dataset) -> str:
    """The data a results file belongs to: root, layout and a hash of ids and labels."""
    digest = hashlib.sha256("\n".join(f"{r.id}\t{r.label}" for r in dataset.records).encode()).hexdigest()[:16]
    return f"{dataset.layout}:{Path(dataset.root).resolve()}:{len(dataset)}:{digest}"


def read_evaluation_data(data: str | os.PathLike[str], class_names: Sequence[str], task: str, layout: str,
                         limit: int | None) -> Dataset:
    dataset = read_dataset(data, layout=layout, classes=class_names if task != "segment" else None)
    if task != "segment":
        unlabelled = [r.id for r in dataset if r.label is None]
        if unlabelled:
            raise InputError(f"{data}: {len(unlabelled)} images have no diagnosis (e.g. {unlabelled[:3]}); a "
                             "classifier is evaluated on labelled images only. Fix: pass a labelled dataset")
    else:
        no_mask = [r.id for r in dataset if r.mask is None]
        if no_mask:
            raise InputError(f"{data}: {len(no_mask)} images have no lesion mask (e.g. {no_mask[:3]}); a segmenter "
                             "is evaluated against masks. Fix: use a layout with masks (edgederm masks/, "
                             "isic_segmentation, ph2)")
    return dataset[:limit] if limit else dataset


def iter_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows that were predicted, rows the runtime refused)."""
    ok, failed = [], []
    for row in rows:
        (failed if "error" in row else ok).append(row)
    return ok, failed
