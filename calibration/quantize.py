"""``quantize_bundle``: add an fp16, int8 or int8_dynamic graph per stage, with a fidelity report.

Flow (decisions):
1. Calibration cases: a seeded, stratified sample of ``calib_dir`` (calibration/data.py).
   Held-out cases for the fidelity report: ``eval_dir``; without one, the images of
   ``calib_dir`` that were not sampled; if there are none, the calibration images
   themselves, and the report says ``"held_out": false``.
2. Every stage gets the inputs it really sees: tiles for segmenters, windows for
   windowed stages, and for later stages the fp32 outputs of the earlier ones
   (ONNX Runtime on CPU).
3. INT8 (static): each stage quantized (calibration/graphs.py). The whole bundle is
   then run end to end *by the runtime* (``DeployedModel``, the device's own code:
   tiling, blending, window streaming, temperature) on the calibration cases, and its
   decisions compared with fp32: class per image, or mask pixel per image for
   segmenters. Below ``target_agreement`` the per-node sensitivity is measured
   (calibration/sensitivity.py) and the most damaging nodes, across all stages, go
   back to float until the target is reached, or the report says it was not and
   what was reached. fp16 gets the same end-to-end check (no fallback: the report
   says whether the target was met); int8_dynamic first quantizes every MatMul and,
   below the target, keeps the attention products (two activations) in float.
4. ``gate`` (calibration/gate.py): clinical metrics of the graphs, as the device runs
   them, against fp32 on the labelled ``eval_dir``; below the gate the same per-node
   fallback runs on the gate's slack (and the agreement target's, when one is set).
5. Fidelity against fp32 on the held-out cases (calibration/fidelity.py), printed and
   stored in the manifest under ``calibration[precision]``. On a labelled split the
   temperature and review thresholds are refitted for the new graphs
   (calibration/clinical.py) and stored under ``clinical.precisions[precision]``.
6. Atomic update: candidate graphs live in a hidden staging folder inside the bundle;
   the final graphs get names of their own (content hash) so a graph the current
   manifest references is never overwritten, then the manifest is replaced in one
   rename, then files no longer referenced are deleted. An interrupted quantize
   leaves the previous bundle intact and loadable; the next quantize removes the
   staging folder it left (runtime/staging.py).

Time and memory (paper-size bundles run for minutes): every phase is timed (wall, CPU,
peak memory; calibration/progress.py) into the report's ``profile``, with progress
lines and the time left. Each image goes through fp32 once for the calibration
inputs and the reference decisions together; windows/tiles are sampled per image as
they stream (``windows_per_image``); calibration statistics are streamed in
memory-bounded sub-batches (calibration/graphs.py ``calibration_ranges``); the fp32
and quantized runs of the evaluation images are made once and shared by the
fidelity report, the clinical refit and the gate.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgederm.runtime.bundle import Manifest, read_manifest, sha256_file, write_manifest
from edgederm.runtime.errors import InputError
from edgederm.runtime.imageio import read_image
from edgederm.runtime.staging import make_staging

from .data import Case, StageInputs, batch_feeds, read_cases, select_calibration
from .progress import Profile
from .clinical import refit_clinical
from .cpu_form import GRAPH_CPU_KEYS, cpu_lines, cpu_record
from .fidelity import classification_fidelity, segmentation_fidelity
from .gate import GateTerm, check_defined, clinical_metrics, format_table, gate_table, parse_gate
from .graphs import (BACKENDS, FORMATS, INT8_TYPES, METHODS, QUANTIZED_OPS, QuantizeError, QuantSettings, prepare_graph,
                     quantize_dynamic_graph, quantize_graph, save_model)
from .sensitivity import fallback as run_fallback
from .sensitivity import SENSITIVITY_BATCHES, node_sensitivity, rank, return_to_float

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp16", "int8_dynamic")
MAX_EVAL_IMAGES = 256

__all__ = ["BACKENDS", "FORMATS", "INT8_TYPES", "METHODS", "PRECISIONS", "QUANTIZED_OPS", "QuantizeError",
           "fidelity", "quantize_bundle", "quantize_graph"]


def fidelity(fp32_probs: np.ndarray, int8_probs: np.ndarray, labels: np.ndarray | None, class_names: list[str]) -> dict[str, Any]:
    """Classification fidelity (kept under its old name)."""
    return classification_fidelity(fp32_probs, int8_probs, labels, class_names)


class _Evaluator:
    """Runs the bundle through the runtime with chosen graphs per stage; caches decoded images."""

    def __init__(self, manifest: Manifest, precision: str, inputs: StageInputs, threads: int = 2) -> None:
        self.manifest = manifest
        self.precision = precision
        self.inputs = inputs
        self.threads = threads
        self.task = manifest.model.task
        self._images: dict[Path, np.ndarray] = {}
        self.logits: list[np.ndarray] = []  # classifiers: the logits of the latest predict's cases
        self._fp32_logits: list[np.ndarray] = []  # fp32 logits of the labelled evaluation cases
        # Results per (cases, graphs): fp32 ones for good, the quantized ones of the latest
        # graphs only (fidelity, refit and gate ask for the same runs; each is minutes at 2048^2).
        self._runs: dict[tuple[Any, ...], tuple[list[Any], list[np.ndarray]]] = {}

    def _image(self, path: Path) -> np.ndarray:
        if path not in self._images:
            self._images[path] = read_image(path)
        return self._images[path]

    def _model(self, graphs: dict[str, str] | None, memo: _StageMemo | None = None) -> Any:
        from edgederm.runtime.model import DeployedModel

        model = DeployedModel(self.manifest, backend="onnxruntime-cpu", precision=self.precision if graphs else "fp32",
                              threads=self.threads, cache=False, graph_overrides=graphs)
        if memo is not None:
            model.pipeline.backends = {name: memo.wrap(backend, (graphs or {}).get(name, f"fp32:{name}"))
                                       for name, backend in model.pipeline.backends.items()}
        return model

    def predict(self, cases: list[Case], graphs: dict[str, str] | None,
                tick: Callable[[int], None] | None = None, memo: _StageMemo | None = None) -> list[Any]:
        """Results for ``cases``; ``graphs`` maps stage -> file relative to the bundle (None: fp32).
        ``tick(k)``: called after the k-th case. The same request again is answered from memory;
        with ``memo``, so is a stage whose graph and inputs it has seen."""
        key = (tuple(c.image for c in cases), tuple(sorted(graphs.items())) if graphs else None)
        if key in self._runs:
            results, logits = self._runs[key]
            self.logits = list(logits)
            return list(results)
        model = self._model(graphs, memo)
        results = []
        self.logits = []
        for n, case in enumerate(cases):
            request = self.inputs.request(case, self._image(case.image), self._image)
            results.append(model.predict(dermoscopy=request.dermoscopy, clinical=request.clinical,
                                         metadata=request.metadata))
            if "logits" in model.last_run:
                self.logits.append(model.last_run["logits"])
            if tick is not None:
                tick(n + 1)
        if graphs:
            self._runs = {k: v for k, v in self._runs.items() if k[1] is None}
        self._runs[key] = (list(results), list(self.logits))
        return results

    def runner(self, case: Case, graphs: dict[str, str] | None) -> Callable[[], object]:
        """One prediction of ``case`` with ``graphs`` (None: fp32), for timing."""
        model = self._model(graphs)
        request = self.inputs.request(case, self._image(case.image), self._image)
        return lambda: model.predict(dermoscopy=request.dermoscopy, clinical=request.clinical, metadata=request.metadata)

    def refitted(self, cases: list[Case], graphs: dict[str, str]) -> tuple[list[Any], dict[str, float], dict[str, Any]]:
        """Results of ``graphs`` on labelled ``cases`` with their own refitted temperature and
        thresholds (calibration/clinical.py); the settings and the refit report."""
        from edgederm.runtime.model import classification_result

        names = list(self.manifest.model.class_names)
        labels = np.array([c.label for c in cases], np.int64)
        if not self._fp32_logits:
            self.predict(cases, None)
            self._fp32_logits.extend(self.logits)
        self.predict(cases, graphs)
        own, report = refit_clinical(np.stack(self._fp32_logits), np.stack(self.logits), labels, names,
                                     self.manifest.clinical)
        clinical = self.manifest.clinical.with_settings(own)
        results = [classification_result(z, names, clinical, self._image(c.image), "onnxruntime", self.precision)
                   for z, c in zip(self.logits, cases)]
        return results, own, report

    def decisions(self, results: list[Any]) -> list[np.ndarray]:
        if self.task == "segment":
            return [r.mask for r in results]
        names = list(self.manifest.model.class_names)
        return [np.array([r.probabilities[n] for n in names], np.float32) for r in results]

    def agreement(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        if self.task == "segment":
            same = sum(int((a == b).sum()) for a, b in zip(reference, candidate))
            return same / max(1, sum(a.size for a in reference))
        return float(np.mean([a.argmax() == b.argmax() for a, b in zip(reference, candidate)]))


class _StageMemo:
    """Stage outputs by (graph file, input bytes), for the repeated agreement passes on the
    calibration images: a fallback step that returns nodes of one stage to float re-runs
    that stage and those after it, not the stages it left as they were (on RemixFormer++
    the 64-window encoder or the clinical encoder, most of the time). At most
    ``max_bytes`` of outputs are kept."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._store: dict[bytes, dict[str, np.ndarray]] = {}

    def wrap(self, backend: Any, graph: str) -> Any:
        memo = self

        class _Memoized:
            def __getattr__(self, name: str) -> Any:
                return getattr(backend, name)

            def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                digest = hashlib.blake2b(graph.encode(), digest_size=20)
                for name in sorted(feed):
                    value = np.ascontiguousarray(feed[name])
                    digest.update(f"{name}{value.dtype}{value.shape}".encode())
                    digest.update(value.data)
                key = digest.digest()
                if key in memo._store:
                    memo.hits += 1
                    return dict(memo._store[key])
                out = backend.run(feed)
                size = sum(v.nbytes for v in out.values())
                if memo.bytes + size <= memo.max_bytes:
                    memo._store[key] = {k: np.array(v, copy=True) for k, v in out.items()}
                    memo.bytes += size
                return out

        return _Memoized()


def _held_out(calib_dir: Path, chosen: list[Case], eval_dir: Path | None, seed: int) -> tuple[list[Case], bool]:
    if eval_dir is not None:
        cases = read_cases(eval_dir)
        if not cases:
            raise InputError(f"no images found in the evaluation folder {eval_dir}")
        held = True
    else:
        used = {c.image for c in chosen}
        cases = [c for c in read_cases(calib_dir) if c.image not in used]
        held = bool(cases)
        if not cases:
            cases = list(chosen)
    if len(cases) > MAX_EVAL_IMAGES:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(cases), MAX_EVAL_IMAGES, replace=False))
        cases = [cases[int(i)] for i in keep]
    return cases, held


def _read_mask(case: Case, shape: tuple[int, ...]) -> np.ndarray | None:
    import cv2

    if case.mask is None:
        return None
    mask = cv2.imread(str(case.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        return None
    if mask.shape != shape[:2]:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)


def quantize_bundle(
    bundle: str | os.PathLike[str], calib_dir: str | os.PathLike[str], *, precision: str = "int8",
    method: str = "minmax", per_channel: bool = True, max_images: int = 64, eval_dir: str | os.PathLike[str] | None = None,
    seed: int = 0, say: Callable[[str], None] = print, target_agreement: float | None = 0.99,
    format: str = "qdq", activation_type: str = "uint8", weight_type: str = "int8", backend: str = "onnxruntime",
    sensitivity_seconds: float = 60.0, max_units: int = 256, batch_size: int = 8, threads: int = 2,
    gate: str | None = None, windows_per_image: int | None = None, for_cpu: str | None = None,
) -> dict[str, Any]:
    """Add a ``precision`` graph per stage to ``bundle``; store and return the calibration report.

    ``for_cpu``: the int8 kernel class of the CPU the int8 graphs are for (runtime/cpu.py:
    ``avx2`` for x86 without VNNI, ``vnni``, ``amx``, ``arm-dot`` ...); None: this CPU's.
    Classes whose u8 x s8 kernels saturate get 7-bit weights (:func:`cpu_record`).

    ``target_agreement``: decision agreement with fp32 (calibration cases, end to end)
    the int8 graphs must reach; nodes return to float until they do. None: no fallback.
    ``gate``: clinical metric changes against fp32 on the labelled ``eval_dir`` the graphs
    must keep (calibration/gate.py), e.g. ``"sensitivity[melanoma]>=-0.01,ece<=+0.01"``;
    the report's ``gate.reached`` says whether they do.
    ``windows_per_image``: windows (or tiles) of each calibration image kept per stage for
    the calibration statistics, a seeded sample drawn as the fp32 pass streams them
    (None: enough for ``max_units`` over the images). Time and peak memory per phase are
    in the report's ``profile``.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)} "
                         "(fp32 is what export writes)")
    if target_agreement is not None and not 0.0 < target_agreement <= 1.0:
        raise InputError(f"target_agreement must be in (0, 1]; got {target_agreement} (e.g. 0.99)")
    if windows_per_image is not None and windows_per_image < 1:
        raise InputError(f"windows_per_image must be >= 1; got {windows_per_image} (e.g. 8, or None for all "
                         f"{max_units} calibration inputs spread over the images)")
    terms = parse_gate(gate) if gate else None
    cpu = cpu_record(precision, for_cpu, backend, activation_type)
    reduce_range = bool(cpu and cpu["saturation_free"])
    settings = QuantSettings(method=method, per_channel=per_channel, format=format, activation_type=activation_type,
                             weight_type=weight_type, backend=backend, reduce_range=reduce_range) \
        if precision == "int8" else None
    start = time.monotonic()
    manifest = read_manifest(bundle)
    root = manifest.root
    calib = select_calibration(Path(calib_dir), max_images=max_images, seed=seed)
    eval_cases, held_out = _held_out(Path(calib_dir), calib.cases, Path(eval_dir) if eval_dir is not None else None, seed)
    if terms and (eval_dir is None or manifest.model.task == "segment" or any(c.label is None for c in eval_cases)):
        raise InputError("--gate needs a classifier and a labelled --eval folder (labels.csv + images/); got "
                         f"task {manifest.model.task!r}, --eval {eval_dir}")
    stages = manifest.stages
    say(f"{precision}: calibrating {len(stages)} stage(s) of {manifest.model.name} ({manifest.model.task}) "
        f"on {len(calib)} images from {calib_dir}" + (f" ({method}, per-channel={per_channel}, {format}, "
                                                       f"activations {activation_type}, {backend})" if settings else ""))
    staging = make_staging(root, ".quantize-")
    profile = Profile(say)
    try:
        report = _quantize(manifest, calib, eval_cases, held_out, precision, settings, staging, say=say,
                           target=target_agreement, seed=seed, sensitivity_seconds=sensitivity_seconds,
                           max_units=max_units, batch_size=batch_size, threads=threads, gate=terms,
                           reduce_range=reduce_range, profile=profile, windows_per_image=windows_per_image)
        report["cpu"] = cpu
        with profile.phase("write bundle"):
            report["seconds"] = round(time.monotonic() - start, 1)
            report["profile"] = profile.to_dict()
            _commit(manifest, precision, report, staging, say)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["profile"] = profile.to_dict()
    _print_report(report, say)
    say(f"time and memory per phase ({precision}; peak = the phase's own high-water mark):")
    for line in profile.lines():
        say(line)
    return report


def _quantize(manifest: Manifest, calib: Any, eval_cases: list[Case], held_out: bool, precision: str,
              settings: QuantSettings | None, staging: Path, *, say: Callable[[str], None], target: float | None,
              seed: int, sensitivity_seconds: float, max_units: int, batch_size: int, threads: int,
              gate: list[GateTerm] | None = None, reduce_range: bool = False, profile: Profile | None = None,
              windows_per_image: int | None = None) -> dict[str, Any]:
    import onnx

    profile = profile or Profile(say)

    root = manifest.root
    rel = staging.relative_to(root).as_posix()
    stages = manifest.stages
    fp32 = {s.name: manifest.graph_path(s, "fp32") for s in stages}
    inputs = StageInputs(manifest, say=say)
    evaluator = _Evaluator(manifest, precision, inputs, threads)
    staged: dict[str, str] = {}  # stage -> file relative to the bundle
    gate_report: dict[str, Any] | None = None
    stage_info: dict[str, Any] = {}
    fallback_report: dict[str, Any] | None = None
    reference: list[Any] = []  # fp32 decisions on the calibration cases, computed on first use
    memo = _StageMemo()

    def agreement_of(graphs: dict[str, str]) -> float:
        """End-to-end decision agreement of ``graphs`` with fp32 on the calibration cases."""
        if not reference:
            with profile.phase("fp32 pass (agreement reference)", len(calib)) as tick:
                reference.extend(evaluator.decisions(evaluator.predict(calib.cases, None, tick)))
        with profile.phase(f"{precision} pass (agreement)", len(calib)) as tick:
            return evaluator.agreement(reference, evaluator.decisions(evaluator.predict(calib.cases, graphs, tick, memo)))

    # The passes still to come, in images, for the overall time-left estimate.
    if target is not None:
        profile.plan(f"{precision} pass (agreement)", len(calib))
        if precision != "int8" or manifest.model.task == "segment":
            profile.plan("fp32 pass (agreement reference)", len(calib))
    profile.plan("fidelity", 2 * len(eval_cases))
    if precision == "int8":
        assert settings is not None
        with profile.phase("fp32 pass (stage inputs)", len(calib)) as tick:
            per_case = inputs.run(calib.cases, fp32, threads=threads, tick=tick, seed=seed,
                                  rows_per_case=windows_per_image or -(-max_units // len(calib)))
        if manifest.model.task != "segment" and len(inputs.logits) == len(calib):
            # The fp32 pass that made the stage inputs gave the reference decisions too
            # (argmax of the logits is argmax of the probabilities).
            reference.extend(inputs.logits)
        prepared, qdq, feeds = {}, {}, {}
        for stage in stages:
            name = stage.name
            # A graph with a fixed batch (an imported ONNX file whose rows mix) takes that batch only.
            fixed = {spec.shape[0] for spec in stage.inputs if isinstance(spec.shape[0], int)}
            feeds[name] = batch_feeds(per_case.pop(name), batch_size=min(fixed) if fixed else batch_size,
                                      max_units=max_units, seed=seed)
            units = sum(len(next(iter(f.values()))) for f in feeds[name])
            say(f"  quantizing {name} on {units} calibration inputs")
            path = staging / f"{name}.int8.onnx"
            with profile.phase(f"calibrate + quantize {name}"):
                prepared[name] = prepare_graph(fp32[name], staging / f"{name}.prepared.onnx")
                quantize_graph(prepared[name], path, feeds[name], settings=settings, prepared=True)
            qdq[name] = onnx.load(str(path))
            staged[name] = f"{rel}/{path.name}"
            stage_info[name] = {"calibration_inputs": units}
        all_int8 = dict(staged)
        scores: dict[str, float | None] = {}
        floats: dict[str, Any] = {}

        def ranking() -> list[str]:
            """Quantized nodes of every stage, most damaging first (measured once)."""
            if not scores:
                say(f"  measuring per-node sensitivity (budget {sensitivity_seconds:.0f} s per stage)")
                floats.update({n: onnx.load(str(p)) for n, p in prepared.items()})
                for stage in stages:
                    name = stage.name
                    with profile.phase(f"sensitivity {name}"):
                        stage_scores = node_sensitivity(qdq[name], floats[name], feeds[name][:SENSITIVITY_BATCHES],
                                                        sensitivity_seconds, say)
                    scores.update({f"{name}/{node}": v for node, v in stage_scores.items()})
            return rank(scores)

        if target is not None:
            base = agreement_of(staged)
            say(f"  end-to-end decision agreement with fp32 on the calibration images: {base:.4f}")
            if base < target:
                say(f"  below the target {target:.4f}")
                ranked = ranking()

                def evaluate(k: int) -> float:  # k = 0: the all-INT8 agreement measured above
                    if k == 0:
                        return base
                    return agreement_of(_with_float_nodes(k, ranked, qdq, floats, staging, rel, staged))

                result = run_fallback(len(ranked), evaluate, target, say)
                result.sensitivity = scores
                chosen = ranked[:len(result.excluded)]
                result.excluded = chosen
                staged = _with_float_nodes(len(chosen), ranked, qdq, floats, staging, rel, staged)
                fallback_report = result.to_dict()
            else:
                fallback_report = {"target_agreement": target, "reached": True, "agreement": base,
                                   "agreement_all_int8": base, "nodes_to_exclude": []}
        if gate:
            gate_report = _apply_gate(gate, evaluator, eval_cases, staged, all_int8, ranking, qdq, floats, staging,
                                      rel, target, agreement_of, say)
            staged = gate_report.pop("_staged")
    elif precision == "fp16":
        from .fp16 import convert_to_fp16

        for stage in stages:
            name = stage.name
            path = staging / f"{name}.fp16.onnx"
            with profile.phase(f"convert {name}"):
                stage_info[name] = convert_to_fp16(fp32[name], path)
            staged[name] = f"{rel}/{path.name}"
            say(f"  {name}: fp16 with fp32 inputs/outputs ({stage_info[name]['fp32_nodes']} nodes kept in fp32)")
    else:  # int8_dynamic
        # Fastest form first (attention products in INT8 too); if that misses the
        # target, the attention products go back to float (only weight MatMuls INT8).
        tried: list[dict[str, Any]] = []
        for weights_only in (False, True):
            for stage in stages:
                name = stage.name
                path = staging / f"{name}.int8_dynamic{'.weights' if weights_only else ''}.onnx"
                with profile.phase(f"quantize {name}"):
                    stage_info[name] = quantize_dynamic_graph(fp32[name], path, weights_only_matmul=weights_only,
                                                              reduce_range=reduce_range)
                staged[name] = f"{rel}/{path.name}"
            form = "weight MatMuls" if weights_only else "every MatMul (attention products too)"
            say(f"  dynamic INT8 of {form}; {sum(i['fused_gelu'] for i in stage_info.values())} GELU fused")
            if target is None:
                break
            reached = agreement_of(staged)
            tried.append({"matmul_weights_only": weights_only, "agreement": reached})
            say(f"  end-to-end decision agreement with fp32 on the calibration images: {reached:.4f}")
            if reached >= target:
                break
        if target is not None:
            fallback_report = {"target_agreement": target, "reached": tried[-1]["agreement"] >= target,
                               "agreement": tried[-1]["agreement"], "forms_tried": tried,
                               "note": "fallback: attention products back to float, then stop"}
            if not fallback_report["reached"]:
                say(f"  WARNING: int8_dynamic agreement {tried[-1]['agreement']:.4f} is below the target {target:.4f}")

    if precision == "fp16" and target is not None:
        reached = agreement_of(staged)
        fallback_report = {"target_agreement": target, "reached": reached >= target, "agreement": reached,
                           "note": "no automatic fallback for this precision"}
        if reached < target:
            say(f"  WARNING: {precision} agreement {reached:.4f} is below the target {target:.4f}")

    if gate and precision != "int8":
        gate_report = _apply_gate(gate, evaluator, eval_cases, staged, staged, None, {}, {}, staging, rel, None,
                                  agreement_of, say)
        staged = gate_report.pop("_staged")
    say(f"  fidelity on {len(eval_cases)} {'held-out' if held_out else 'calibration (no held-out images)'} images")
    with profile.phase("fidelity: fp32 pass", len(eval_cases)) as tick:
        profile.planned.pop("fidelity", None)
        profile.plan(f"fidelity: {precision} pass", len(eval_cases))
        fp32_results = evaluator.predict(eval_cases, None, tick)
    with profile.phase(f"fidelity: {precision} pass", len(eval_cases)) as tick:
        quant_results = evaluator.predict(eval_cases, staged, tick)
    if manifest.model.task == "segment":
        masks = [_read_mask(c, r.mask.shape) for c, r in zip(eval_cases, fp32_results)]
        fid = segmentation_fidelity([r.mask for r in fp32_results], [r.mask for r in quant_results], masks)
    else:
        p32 = np.stack(evaluator.decisions(fp32_results))
        pq = np.stack(evaluator.decisions(quant_results))
        labels = [c.label for c in eval_cases]
        fid = classification_fidelity(p32, pq, np.array(labels) if all(x is not None for x in labels) else None,
                                      list(manifest.model.class_names))
    fid["held_out"] = held_out
    clinical_own, clinical_report = None, None
    if manifest.model.task != "segment" and eval_cases and all(c.label is not None for c in eval_cases):
        with profile.phase("clinical refit"):
            _, clinical_own, clinical_report = evaluator.refitted(eval_cases, staged)
        say(f"  {precision} refitted on {len(eval_cases)} labelled images: temperature "
            f"{clinical_report['temperature_fp32']:.3f} -> {clinical_report['temperature']:.3f}, ECE "
            f"{clinical_report['ece_before']:.4f} -> {clinical_report['ece_after']:.4f} (fp32 {clinical_report['ece_fp32']:.4f})")
    with profile.phase("latency (fp32 and quantized, interleaved)"):
        latency = _latency(evaluator, eval_cases, staged, precision, threads)

    entry: dict[str, Any] = {"precision": precision}
    if settings is not None:
        entry.update(settings.to_dict())
    elif precision == "fp16":
        from .fp16 import KEEP_FP32

        entry.update({"method": "cast", "kept_fp32_ops": sorted(KEEP_FP32), "io_dtype": "float32"})
    else:
        entry.update({"method": "dynamic", **next(iter(stage_info.values()))})
    entry.update({
        "images": len(calib), "dataset_sha256": calib.sha256, "stages": stage_info,
        "target": fallback_report, "fidelity": fid, "latency": latency, "notes": list(inputs.notes),
        "gate": gate_report, "clinical_refit": clinical_report, "_staged": staged, "_clinical": clinical_own,
    })
    return entry


def _apply_gate(gate: list[GateTerm], evaluator: _Evaluator, eval_cases: list[Case], staged: dict[str, str],
                all_int8: dict[str, str], ranking: Callable[[], list[str]] | None, qdq: dict[str, Any], floats: dict[str, Any], staging: Path,
                rel: str, target: float | None, agreement_of: Callable[[dict[str, str]], float],
                say: Callable[[str], None]) -> dict[str, Any]:
    """Check ``gate`` on ``staged``; below it (int8: ``ranking`` given) find the fewest ranked nodes
    of the ``all_int8`` graphs to return to float that meet it and the agreement target.
    The report and the graphs to keep (``_staged``)."""
    manifest = evaluator.manifest
    names = list(manifest.model.class_names)
    labels = [int(c.label) for c in eval_cases]  # type: ignore[arg-type]
    malignant = [c for c in manifest.clinical.settings.get("malignant_classes") or [] if c in names]
    reference = clinical_metrics(evaluator.predict(eval_cases, None), labels, names, malignant)
    check_defined(gate, reference, labels, names)

    def measure(graphs: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
        results, _, _ = evaluator.refitted(eval_cases, graphs)
        slack, rows = gate_table(gate, reference, clinical_metrics(results, labels, names, malignant))
        if target is not None:  # the agreement target still holds alongside the gate
            slack = min(slack, agreement_of(graphs) - target)
        return slack, rows

    base_slack, base_rows = measure(staged)
    say(f"  gate {','.join(map(str, gate))} on {len(eval_cases)} labelled images, as deployed (own temperature):")
    for line in format_table(base_rows):
        say(line)
    report: dict[str, Any] = {"gate": [str(t) for t in gate], "images": len(eval_cases), "table_before": base_rows,
                              "nodes_kept_float": [], "reached": base_slack >= 0, "table": base_rows}
    if base_slack >= 0 or ranking is None:
        return {**report, "_staged": staged}
    ranked = ranking()
    say(f"  gate not met: returning the most sensitive of {len(ranked)} nodes to float")

    def slack_at(k: int) -> float:
        return measure(_with_float_nodes(k, ranked, qdq, floats, staging, rel, all_int8))[0]

    result = run_fallback(len(ranked), slack_at, 0.0, say, measure="gate slack")
    chosen = ranked[:len(result.excluded)]
    final = _with_float_nodes(len(chosen), ranked, qdq, floats, staging, rel, all_int8)
    slack, rows = measure(final)
    report.update(nodes_kept_float=chosen, reached=slack >= 0, table=rows,
                  steps=[{"float_nodes": k, "slack": v} for k, v in result.evaluations])
    return {**report, "_staged": final}


def _with_float_nodes(k: int, ranked: list[str], qdq: dict[str, Any], floats: dict[str, Any], staging: Path,
                      rel: str, current: dict[str, str]) -> dict[str, str]:
    """Stage graphs with the first ``k`` ranked ("stage/node") nodes returned to float."""
    graphs = dict(current)
    by_stage: dict[str, list[str]] = {}
    for item in ranked[:k]:
        stage, node = item.split("/", 1)
        by_stage.setdefault(stage, []).append(node)
    for stage, model in qdq.items():
        nodes = by_stage.get(stage, [])
        if not nodes:  # the all-INT8 graph already staged
            continue
        path = staging / f"{stage}.int8.float{len(nodes)}.onnx"
        if not path.exists():
            save_model(return_to_float(model, floats[stage], nodes), path)
        graphs[stage] = f"{rel}/{path.name}"
    return graphs


def _commit(manifest: Manifest, precision: str, report: dict[str, Any], staging: Path, say: Callable[[str], None]) -> None:
    root = manifest.root
    staged: dict[str, str] = report.pop("_staged")
    own = report.pop("_clinical", None)
    data: dict[str, Any] = copy.deepcopy(dict(manifest.data))
    if own is not None:
        clinical: dict[str, Any] = data["clinical"] if isinstance(data.get("clinical"), dict) else {}
        clinical.setdefault("precisions", {})[precision] = own
        data["clinical"] = clinical
    elif isinstance(data.get("clinical"), dict):  # settings fitted for the graphs being replaced
        (data["clinical"].get("precisions") or {}).pop(precision, None)
    previous: list[str] = []
    for stage in data["stages"]:
        source = root / staged[stage["name"]]
        digest = sha256_file(source)
        final = f"{stage['name']}.{precision}.{digest[:12]}.onnx"
        if not (root / final).exists():
            # The staging folder is inside the bundle: one rename, no copy.
            os.replace(source, root / final)
        old = stage["graphs"].get(precision, {}).get("file")
        if old and old != final:
            previous.append(old)
        stage["graphs"][precision] = {"file": final, "sha256": digest}
        if report.get("cpu"):
            stage["graphs"][precision]["cpu"] = {k: report["cpu"][k] for k in GRAPH_CPU_KEYS}
        data["files"][final] = {"sha256": digest, "bytes": (root / final).stat().st_size}
    still_used = {g["file"] for s in data["stages"] for g in s["graphs"].values()}
    for old in previous:
        if old not in still_used:
            data["files"].pop(old, None)
    calibration = data.get("calibration")
    if not isinstance(calibration, dict):
        calibration = {}
    elif "precision" in calibration and "fidelity" in calibration:  # written by an older SDK: one section
        calibration = {calibration["precision"]: calibration}
    calibration[precision] = report
    data["calibration"] = calibration
    try:
        write_manifest(root, data)
    except BaseException:
        referenced = set(manifest.files)
        for stage in data["stages"]:
            new = stage["graphs"][precision]["file"]
            if new not in referenced:
                (root / new).unlink(missing_ok=True)
        raise
    for old in previous:
        if old not in still_used:
            (root / old).unlink(missing_ok=True)  # no longer referenced
    say(f"added {precision} graphs to {root}: {', '.join(s['graphs'][precision]['file'] for s in data['stages'])}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _latency(evaluator: _Evaluator, cases: list[Case], graphs: dict[str, str], precision: str,
             threads: int) -> dict[str, Any]:
    """Median per-image time of fp32 and ``precision`` on this machine's CPU, the two
    alternated in rounds on the first evaluation image (runtime/latency.py), with this
    CPU's identity: ``precision="auto"`` on CPU uses the ratio when it loads on the same
    CPU and measures again on any other (reduced precision is not always faster on a
    CPU: small models spend their time in quantize/dequantize)."""
    import platform

    from edgederm.runtime.backends.onnxruntime import cpu_identity
    from edgederm.runtime.latency import interleaved_medians

    measured = interleaved_medians({"fp32": evaluator.runner(cases[0], None),
                                    precision: evaluator.runner(cases[0], graphs)})
    fp32_ms, quant_ms = measured.ms["fp32"], measured.ms[precision]
    return {"backend": "onnxruntime-cpu", "threads": threads, "rounds": measured.rounds, "cpu": cpu_identity(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "fp32_ms": fp32_ms, "ms": quant_ms, "speedup": measured.speedups().get(precision)}


def _print_report(report: dict[str, Any], say: Callable[[str], None]) -> None:
    fid = report["fidelity"]
    keys = [k for k in ("images", "held_out", "decision_agreement", "max_probability_diff", "mean_probability_diff",
                        "accuracy_fp32", "accuracy_quantized", "ece_change", "pixel_agreement", "dice_vs_fp32",
                        "hd95_vs_fp32", "dice_fp32", "dice_quantized", "dice_change", "hd95_change") if k in fid]
    say(f"fidelity of {report['precision']} against fp32:")
    for key in keys:
        say(f"  {key:<24} {_fmt(fid[key])}")
    for name, change in (fid.get("recall_change") or {}).items():
        say(f"  recall change {name:<10} {change:+.4f}")
    if report.get("cpu"):
        for line in cpu_lines(report["cpu"]):
            say(line)
    latency = report.get("latency")
    if latency:
        say(f"  CPU inference per image    fp32 {latency['fp32_ms']:.1f} ms, {report['precision']} {latency['ms']:.1f} ms "
            f"({latency['speedup']}x; ONNX Runtime, {latency['threads']} threads, median of {latency['rounds']} interleaved rounds)")
    gate = report.get("gate")
    if gate:
        say(f"  gate {'reached' if gate['reached'] else 'NOT reached'} with {len(gate['nodes_kept_float'])} node(s) "
            f"kept in float{': ' + ', '.join(gate['nodes_kept_float']) if gate['nodes_kept_float'] else ''}")
        for line in format_table(gate["table"]):
            say(line)
    target = report.get("target")
    if target:
        state = "reached" if target["reached"] else "NOT reached"
        extra = f", {len(target.get('nodes_to_exclude', []))} node(s) kept in float" if "nodes_to_exclude" in target else ""
        say(f"  target agreement {target['target_agreement']:.4f} {state}: {target['agreement']:.4f}{extra}")
