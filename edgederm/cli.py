"""The ``edgederm`` command: one entry point for the whole pipeline.

Each sub-command imports what it needs when it runs, so ``edgederm predict`` and
``edgederm doctor`` work on a device without torch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.handlers
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

from edgederm.runtime.cpu import KERNEL_CLASSES
from edgederm.runtime.errors import EdgeDermError, PythonVersionError
from edgederm.training.options import add_train_arguments

# The release side (PyTorch, ONNX) needs Python 3.10+; every other command is device-side and
# runs on Python 3.8, the Python of JetPack 5.
RELEASE_SIDE_COMMANDS = frozenset({
    "quickstart", "data", "train", "export", "quantize", "evaluate", "bench-precision", "bench", "lint", "models",
})
RELEASE_SIDE_PYTHON = (3, 10)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def require_release_python(command: str, version: Sequence[int] = sys.version_info[:2]) -> None:
    """Refuse a release-side command on a Python older than it needs, before it imports torch."""
    if command in RELEASE_SIDE_COMMANDS and tuple(version[:2]) < RELEASE_SIDE_PYTHON:
        need = ".".join(map(str, RELEASE_SIDE_PYTHON))
        raise PythonVersionError(
            f"`edgederm {command}` needs Python {need} or newer (training, export and quantization use PyTorch "
            f"and ONNX); this is Python {version[0]}.{version[1]}. Fix: run it on a machine with Python {need}+ "
            "(`pip install 'edgederm[export]'`) and copy the bundle here; on this Python the device commands "
            "work: predict, plan, doctor, build, selftest, serve"
        )


# -- sub-commands ------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from edgederm.models.summary import model_table

    rows = model_table(args.pattern, paper_size=None if args.all else False, macs=not args.no_macs)
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, ["name", "family", "task", "modalities", "params_m", "input", "gmacs", "stages"]))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from edgederm.data.synthetic import generate_dataset

    out = generate_dataset(args.out, n_per_class=args.n_per_class, size=args.size, seed=args.seed, progress=True)
    print(f"wrote {args.n_per_class * 3} synthetic cases to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # One implementation for `edgederm train` and `torchrun ... -m edgederm.train`.
    from edgederm.train import run_cli

    return run_cli(args)


def cmd_export(args: argparse.Namespace) -> int:
    from edgederm.export import export_bundle
    from edgederm.export.bundle import model_from_checkpoint_or_name

    if args.module is not None or args.model is None:
        from edgederm.export.own_model import export_module_cli

        export_module_cli(args)
    else:
        model, preprocess, clinical = model_from_checkpoint_or_name(args.model)
        export_bundle(model, args.out, preprocess=preprocess, clinical=clinical, opset=args.opset,
                      verify=not args.no_verify, overwrite=args.overwrite, progress=print, target=args.target)
    return _lint_after(args.out, args.target, None) if args.target else 0


def cmd_import(args: argparse.Namespace) -> int:
    from edgederm.export.own_model import import_cli

    return import_cli(args)


def _add_own_model_arguments(p: argparse.ArgumentParser, module: bool) -> None:
    """Declarations a model from outside the zoo needs (export --module, import)."""
    p.add_argument("--task", choices=["classify", "segment"], default=None if module else "classify",
                   help="classify (default for import) or segment")
    p.add_argument("--input-size", default=None, metavar="HxW", help="model input, e.g. 224 or 256x192")
    p.add_argument("--classes", default=None, metavar="A,B,...", help="class names, comma-separated, in output order")
    p.add_argument("--output", default=None, metavar="NAME" if not module else "KIND",
                   help="auto | logits | probabilities" if module else "graph output to keep (default: the only one)")
    if module:
        p.add_argument("--output-key", default=None, help="key/attribute/index of a dict, tuple or ModelOutput result")
    p.add_argument("--mean", default=None, metavar="R,G,B", help="normalisation mean on the 0..1 scale")
    p.add_argument("--std", default=None, metavar="R,G,B", help="normalisation std on the 0..1 scale")
    p.add_argument("--preprocess-from", default=None, metavar="SRC",
                   help="timm:NAME | torchvision:WEIGHTS | hf:preprocessor_config.json (mean, std, size, crop)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgederm.calibration import quantize_bundle

    target = None if args.no_fallback else args.target_agreement
    report = quantize_bundle(args.bundle, args.calib, precision=args.precision, method=args.method,
                             per_channel=not args.per_tensor, max_images=args.max_images, eval_dir=args.eval, seed=args.seed,
                             target_agreement=target, format=args.format, activation_type=args.activation_type,
                             backend=args.backend, sensitivity_seconds=args.sensitivity_seconds, gate=args.gate,
                             windows_per_image=args.windows_per_image,
                             for_cpu=args.for_cpu,
                             say=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    if args.json:
        _print_json(report)
    target_report = report.get("target") or {}
    gate_report = report.get("gate") or {}
    if args.target and _lint_after(args.bundle, args.target, [args.precision]):
        return 1
    return 0 if target_report.get("reached", True) and gate_report.get("reached", True) else 3


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from edgederm.evaluate import EvaluateOptions, evaluate, write_report

    precisions = None if args.precision == "all" else _names(args.precision)
    folder = args.report or Path(f"evaluation-{args.bundle.resolve().name}")
    options = EvaluateOptions(precisions=precisions, by=_names(args.by), workers=args.workers,
                              malignant=_names(args.malignant) if args.malignant else None, n_boot=args.bootstrap,
                              seed=args.seed, layout=args.layout, backend=args.backend, progress=True, limit=args.limit,
                              ray=args.ray)
    evaluation = evaluate(args.bundle, args.data, folder, options)
    page = write_report(evaluation, folder)
    if args.json:
        _print_json(evaluation)
        return 0
    comparison = evaluation["comparison"]
    rows = []
    for metric, per in comparison.get("metrics", {}).items():
        if "[" in metric:
            continue
        row: dict[str, Any] = {"metric": metric}
        for precision, entry in per.items():
            value, change = entry["value"], entry["change"]
            row[precision] = "n/a" if value is None else f"{value:.4f}"
            if precision != comparison["reference"] and change is not None:
                row[precision] += f" ({change:+.4f})"
        rows.append(row)
    print(_table(rows, ["metric", *evaluation["precisions"]]))
    for precision, summary in evaluation["precisions"].items():
        for field, sub in (summary.get("subgroups") or {}).items():
            if sub["flagged"]:
                gap = sub["gaps"][sub["largest_gap"]]
                print(f"{precision}: {field}: {sub['largest_gap']} gap {gap['gap']:.3f} "
                      f"({gap['best']} {gap['best_value']:.3f} vs {gap['worst']} {gap['worst_value']:.3f}) FLAGGED")
    print(f"report: {page}")
    return 0


def _print_findings(findings: list[Any], target: str) -> None:
    from edgederm.export.lint import summarize

    if not findings:
        print(f"lint: no findings for {target}")
        return
    print(_table(summarize(findings), ["graph", "severity", "rule", "op", "count", "node", "message", "fix"]))
    print(f"lint: {len(findings)} finding(s) for {target} (a row's node is the first of its count)")


def _lint_after(bundle: Path, target: str, precisions: list[str] | None) -> int:
    """`export` / `quantize` with --target: lint what was written; status 1 on findings."""
    from edgederm.export.lint import lint_bundle

    findings = lint_bundle(bundle, target, precisions=precisions)
    _print_findings(findings, target)
    return 1 if findings else 0


def cmd_lint(args: argparse.Namespace) -> int:
    from edgederm.export.lint import lint_bundle

    findings = lint_bundle(args.bundle, args.target, precisions=args.precision or None)
    if args.json:
        _print_json([f.to_dict() for f in findings])
    else:
        _print_findings(findings, args.target)
    return 1 if findings else 0


def cmd_bench_precision(args: argparse.Namespace) -> int:
    from edgederm.bench_precision import run_benchmark, summarize

    rows = run_benchmark(args.out, batch=args.batch, threads=args.threads, window=args.window, calib_images=args.calib_images,
                         eval_images=args.eval_images, seconds=args.seconds, variants=args.variant or None, small=args.small,
                         checkpoint=args.checkpoint,
                         say=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, ["variant", "windows_per_s", "speedup_vs_ort_fp32", "agreement", "cosine_mean", "cosine_min", "size_mb", "note"]))
        for line in summarize(rows):
            print(line)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from edgederm.calibration.profile import format_profiles, profile_bundle

    profiles = profile_bundle(args.bundle, _names(args.precision) if args.precision else None, batch=args.batch,
                              runs=args.runs, threads=args.threads)
    if args.json:
        _print_json({stage: {p: prof.to_dict() for p, prof in per.items()} for stage, per in profiles.items()})
    else:
        for stage, per in profiles.items():
            print(f"stage {stage} (ms per run, nodes in parentheses):")
            print(format_profiles(per, top=args.top))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from edgederm.runtime import load

    metadata = _metadata_argument(args.metadata) if args.metadata else None
    model = load(args.bundle, backend=args.backend, precision=args.precision,
                 memory_budget=getattr(args, "memory_budget", None), **_trust_kwargs(args))
    result = model.predict_file(args.image, metadata=metadata)
    if getattr(args, "overlay", None):
        from edgederm.runtime.imageio import read_image
        from edgederm.runtime.overlay import write_overlay

        if result.mask is None and result.heatmap is None:
            print(f"note: --overlay not written: {args.bundle} gives no mask or heatmap (a classifier)", file=sys.stderr)
        else:
            write_overlay(args.overlay, read_image(args.image), result.mask, result.heatmap)
            print(f"overlay written to {args.overlay}", file=sys.stderr)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(f"label: {result.label}   needs_review: {result.needs_review} {result.review_reasons or ''}")
        for name, p in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<16} {p:.3f}")
        print(f"backend {result.backend}, precision {result.precision}, total {result.timings.get('total', 0):.1f} ms")
        for note in result.notes:
            print(f"note: {note}")
    return 0


def _metadata_argument(value: str) -> Any:
    """``--metadata``: JSON text when it starts with "{", otherwise the path of a JSON file.

    Deciding by the first character (not by trying to open the text as a file) keeps
    inline JSON of any length from being taken for a path.
    """
    from edgederm.runtime.errors import InputError
    from edgederm.runtime.files import read_regular_file

    example = '{"age": 54, "sex": "female"}'
    if value.lstrip().startswith("{"):
        text, source = value, "--metadata JSON text"
    else:
        def refuse(problem: str, fix: str) -> NoReturn:
            raise InputError(f"--metadata {value[:80]!r} is not JSON text (it does not start with '{{') and not a "
                             f"readable JSON file: {problem}; pass JSON text like '{example}' or a file of it")

        text = read_regular_file(value, 1 << 20, refuse).decode("utf-8", errors="replace")
        source = f"--metadata file {value!r}"
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{source} is not valid JSON ({str(exc)[:120]}); example: '{example}'") from exc


def cmd_build(args: argparse.Namespace) -> int:
    from edgederm.export.tensorrt import build_engines

    entries = build_engines(args.bundle, precision=args.precision, workspace=args.workspace, dla=args.dla,
                            timing_cache=args.timing_cache, memory_budget=args.memory_budget,
                            calibration_cache=args.calibration_cache, strongly_typed=args.strongly_typed)
    if args.json:
        _print_json(entries)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edgederm.bench import BenchConfig, format_report, parse_sizes, plot_report, run_bench

    if args.all_models or args.models:
        return _bench_models(args)
    if args.bundle is None and isinstance(args.json, Path):  # `bench --json BUNDLE`: the flag takes no path here
        args.bundle, args.json = args.json, True
    if args.bundle is None:
        from edgederm.runtime.errors import InputError

        raise InputError("edgederm bench needs a BUNDLE folder, or --all-models / --models a,b to benchmark zoo models")
    if args.trusted_key:  # the benchmark's workers load the bundle themselves: check it once, first
        from edgederm.runtime.signing import verify_bundle

        verify_bundle(args.bundle, args.trusted_key)

    engines = ["edgederm"] + ([] if args.peers == "none" else [e.strip() for e in args.peers.split(",") if e.strip()])
    config = BenchConfig(bundle=args.bundle, sizes=parse_sizes(args.sizes), engines=engines, checkpoint=args.checkpoint,
                         torch_model=args.torch_model, precision=args.precision, memory_budget=args.memory_budget,
                         threads=args.threads)
    report = run_bench(config)
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


def _bench_models(args: argparse.Namespace) -> int:
    """``edgederm bench --all-models`` / ``--models a,b``: edgederm/bench_zoo.py."""
    from edgederm.bench_zoo import DEFAULT_MODELS, ZooBenchConfig, format_zoo_report, parse_models, \
        parse_torch_engines, plot_zoo_report, run_zoo_bench
    from edgederm.runtime.bundle import write_json_atomic

    config = ZooBenchConfig(work=args.work, models=parse_models(args.models) if args.models else DEFAULT_MODELS,
                            rounds=args.rounds, size=args.size, calib_images=args.calib_images,
                            cold_start=not args.no_cold_start, threads=args.threads or 2,
                            torch_engines=parse_torch_engines(args.torch_engines),
                            precisions=[] if args.quantize == "none" else [p.strip() for p in args.quantize.split(",")])
    report = run_zoo_bench(config)
    if args.plot:
        plot_zoo_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if isinstance(args.json, Path):
        write_json_atomic(args.json, report)
        print(f"report written to {args.json}", file=sys.stderr)
    print(format_zoo_report(report))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgederm.doctor import diagnose

    report = diagnose(bundle=args.bundle, target=args.target)
    if args.json:
        _print_json(report)
    else:
        for key, value in report.items():
            if key != "mismatches":
                print(f"{key:<22} {value}")
        for problem in report.get("mismatches", []):
            print(f"mismatch: {problem}")
        if "mismatches" in report and not report["mismatches"]:
            print("no mismatch with " + " and ".join(str(v) for v in (args.bundle, args.target) if v))
    return 1 if report.get("mismatches") else 0


def _image_size(text: str) -> tuple[int, int]:
    """``2048`` or ``2048x1536`` (height x width)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected N or HxW in pixels, e.g. 2048 or 2048x1536")
    height = int(parts[0])
    return height, int(parts[-1])


def cmd_plan(args: argparse.Namespace) -> int:
    from edgederm.runtime.bundle import read_manifest
    from edgederm.runtime.memory import ACTIVATION_SCALE, MARGIN_FRACTION, format_size, parse_size, plan
    from edgederm.runtime.targets import load_target

    target = load_target(args.target)
    manifest = read_manifest(args.bundle)
    height, width = args.size
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    result = plan(manifest, budget, height, width, target=target, precision=args.precision)
    if args.json:
        _print_json(result.to_dict())
        return 0
    measured = manifest.memory.measured_on if manifest.memory else {}
    where = f"measured on {measured.get('backend', '?')}, {measured.get('machine', '?')}"
    notes = {
        "runtime": f"{where}: the profile's fixed part less its {measured.get('precision', 'fp32')} graphs",
        "weights": f"the bundle's {args.precision} graph files",
    }
    for term in result.unmeasured:
        fact = target.sources.get(f"memory_plan.{term}_bytes")
        notes[term] = "NOT MEASURED: " + (fact.title if fact else "target profile figure")
    scale = ACTIVATION_SCALE[args.precision]
    rows = [(name, size, notes.get(name, "")) for name, size in result.fixed_parts]
    rows += [
        (f"activations x {result.batch_size}", result.per_tile_bytes * result.batch_size,
         f"measured fp32 slope per tile x {scale:g} ({args.precision} width on the GPU: NOT MEASURED)"),
        ("image buffers", result.image_bytes, "computed: the caller's image and outputs at input resolution"),
        ("accumulators", result.accumulator_bytes, "computed: the tiler's band, or the window embeddings"),
    ]
    print(f"memory plan: {manifest.model.name} on {target.name} ({target.module}"
          f"{', unified memory' if target.unified_memory else ''}), {args.precision}, {height}x{width}")
    for name, size, note in rows:
        print(f"  {name:<20} {format_size(size):>11}  {note}")
    print(f"  {'predicted peak':<20} {format_size(result.predicted_peak_bytes):>11}")
    if result.budget_bytes is not None:
        source = ("--memory-budget" if budget else f"{format_size(target.memory_bytes or 0)} less the OS's "
                  f"{format_size(target.os_reserved_bytes or 0)} (headless; NOT MEASURED)")
        print(f"  {'margin':<20} {format_size(result.margin_bytes):>11}  {MARGIN_FRACTION:.0%} of the budget")
        print(f"  {'budget':<20} {format_size(result.budget_bytes):>11}  {source}")
    print(f"tile batch that fits: {result.batch_size}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from edgederm.quickstart import run_quickstart

    report = run_quickstart(args.out, n_per_class=args.n_per_class, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)
    if args.json:
        _print_json(report)
    return 0


def _trust_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """load() options of the device-trust flags (see _add_trust_options)."""
    return {"trusted_keys": args.trusted_key or None, "key_provider": args.key_file,
            "audit_log": args.audit_log, "audit_fields": args.audit_field or (), "selftest": args.selftest}


def cmd_keygen(args: argparse.Namespace) -> int:
    from edgederm.runtime.signing import key_id, keygen, load_public_key

    private, public = keygen(args.out, curve=args.curve)
    print(f"private key {private} (keep it in the release pipeline, never on a device)")
    print(f"public key  {public} (pin it on devices: --trusted-key); key id {key_id(load_public_key(public))[:16]}")
    if args.graph_key:
        from edgederm.runtime.crypto import new_key_file

        print(f"graph key   {new_key_file(Path(args.out) / 'graph.key')} (for `edgederm encrypt`; give it to devices "
              "through a key provider)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from edgederm.runtime.signing import SIGNATURE_FILE, sign_bundle

    info = sign_bundle(args.bundle, args.key, password=args.password)
    print(f"signed {len(info.files)} files of {args.bundle} with key {info.short_key_id} -> "
          f"{Path(args.bundle) / SIGNATURE_FILE}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from edgederm.runtime.signing import verify_bundle

    info = verify_bundle(args.bundle, args.trusted_key)
    print(f"{args.bundle}: signature by {info.short_key_id} covers its {len(info.files)} files exactly")
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    from edgederm.runtime.crypto import encrypt_bundle

    names = encrypt_bundle(args.bundle, args.key_file)
    print(f"encrypted {len(names)} graphs of {args.bundle}: {', '.join(names)}; sign the bundle again")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from edgederm.runtime.audit import verify_log
    from edgederm.runtime.errors import AuditLogError

    report = verify_log(args.log, partial=args.partial)
    if not report.ok:
        raise AuditLogError(f"audit log chain broken at {report.first_bad}")
    print(f"{args.log}: {report.records} records in {len(report.files)} file(s) chain correctly; head {report.head}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from edgederm.runtime.goldens import add_goldens, selftest_bundle

    if args.action == "add":
        stored = add_goldens(args.bundle, key_provider=args.key_file)
        print(f"stored goldens for {', '.join(sorted(stored))} in {args.bundle}; sign the bundle again")
        return 0
    precisions = [args.precision] if args.precision else None
    rows = selftest_bundle(args.bundle, precisions=precisions, backend=args.backend,
                           trusted_keys=args.trusted_key or None, key_provider=args.key_file)
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, ["stage", "precision", "backend", "max_abs_diff", "tolerance", "passed"]))
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from edgederm.runtime.store import BundleStore

    store = BundleStore(args.store, trusted_keys=getattr(args, "trusted_key", None) or None,
                        key_provider=getattr(args, "key_file", None))
    if args.action == "install":
        if args.bundle is None:
            raise EdgeDermError(f"store install needs a BUNDLE: `edgederm store install BUNDLE --store {args.store}`")
        status = store.install(args.bundle, trial=args.trial)
    elif args.action == "rollback":
        status = store.rollback()
    elif args.action == "mark-good":
        status = store.mark_good()
    elif args.action == "gc":
        removed = store.gc()
        status = store.status()
        status["removed"] = removed
    else:
        status = store.status()
    _print_json(status)
    return 0


def _add_runtime_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    """How a command that loads a bundle runs it: backend, precision, memory budget."""
    if backend:
        p.add_argument("--backend", default="auto",
                       help="auto | onnxruntime-cpu | onnxruntime-cuda | tensorrt | triton://HOST:PORT")
    p.add_argument("--precision", default="auto", help="auto | fp32 | fp16 | int8 | int8_dynamic (what the bundle holds)")
    p.add_argument("--memory-budget", default=None,
                   help="plan the tile batch for this budget, e.g. 1.5GiB (binary units: M = MiB; MB = 10^6 bytes)")


def _add_trusted_key(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--trusted-key", action="append", type=Path, default=[], required=required, metavar="PUB",
                   help="refuse the bundle unless signed by this public key (repeatable)")


def _add_trust_options(p: argparse.ArgumentParser, audit: bool = True) -> None:
    _add_trusted_key(p)
    p.add_argument("--key-file", default=None, metavar="K",
                   help="graph key of an encrypted bundle: a key file, or env:VAR")
    if audit:
        p.add_argument("--audit-log", type=Path, default=None, metavar="LOG", help="append a hash-chained audit record")
        p.add_argument("--audit-field", action="append", default=[], metavar="FIELD",
                       help="metadata field the audit record may hold (repeatable; default none)")
        p.add_argument("--selftest", action="store_true", help="run the bundle's golden self-test before predicting")


def cmd_serve(args: argparse.Namespace) -> int:
    from edgederm.serve.server import run_cli

    return run_cli(args, **_trust_kwargs(args))


def cmd_export_triton(args: argparse.Namespace) -> int:
    from edgederm.serve.triton_repo import run_cli

    return run_cli(args)


# -- parser --------------------------------------------------------------------------
def _target_option(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """--target TARGET: one of the device profiles (runtime/target_profiles)."""
    from edgederm.runtime.targets import target_names

    p.add_argument("--target", required=required, default=None, metavar="TARGET", choices=target_names(),
                   help=help + " One of: %(choices)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgederm",
        description="Deploy dermatology models to Jetson-class dermoscopes: train -> export -> quantize -> predict.",
        epilog="Start with `edgederm quickstart --out qs/`. Each command has --help.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("quickstart", help="generate data, train, export, quantize and predict in one go (~3 min on 2 CPU cores)",
                       description="The whole pipeline on synthetic dermoscopy: data -> train -> ONNX bundle -> INT8 -> predict on a 2048x2048 image. Leaves the bundle in OUT/bundle.")
    p.add_argument("--out", required=True, type=Path, help="folder for data, checkpoint, bundle and report")
    p.add_argument("--n-per-class", type=int, default=200, help="synthetic training images per class (default 200)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("data", help="write a synthetic dermoscopy dataset (images/, masks/, labels.csv)",
                       description="Synthetic dermoscopy cases (nevus, melanoma, vascular) with masks and metadata; deterministic from --seed.")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (32..4096)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a registered model on an image folder -> checkpoint",
                       description="Train on DATA (labels.csv + images/). Writes a checkpoint folder: model.safetensors + config.json (no pickle).")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint or model name -> ONNX bundle, parity checked against PyTorch",
                       description="Export every stage to ONNX (dynamo exporter), check ONNX Runtime against torch at batch 1 and 5, and write a bundle with manifest.json and a sha256 per file.")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder (from `edgederm train`) or a registered model name (random weights)")
    p.add_argument("--module", default=None, metavar="PKG.MOD:FACTORY",
                   help="your own PyTorch model: a callable returning the nn.Module (with --task, --input-size, --classes)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset the exporter writes (18, its native one); "
                   "for TensorRT 8.5/8.6 pass --target, which converts to 17")
    _target_option(p, "device profile: write the graph forms its TensorRT parser takes, record it in the manifest, "
                      "then lint (exit status 1 on findings).")
    p.add_argument("--no-verify", action="store_true", help="skip the torch vs ONNX Runtime parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    _add_own_model_arguments(p, module=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="an existing ONNX file -> bundle (checked, NHWC/fixed batch adapted, run once)",
                       description="Check an ONNX graph (checker, shapes, opset, layout, dtype), make its batch dynamic "
                                   "where that is safe, run it once in ONNX Runtime and write a bundle.")
    p.add_argument("onnx", type=Path, help="the .onnx file")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    _add_own_model_arguments(p, module=False)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("quantize", help="add an INT8 / FP16 graph per stage to a bundle, with a fidelity report",
                       description="Calibrate on images read through the runtime preprocessing (tiles for segmenters, windows "
                                   "for windowed stages, earlier stages' fp32 outputs for later stages) and add int8 (static QDQ), "
                                   "fp16 or int8_dynamic (CPU only) graphs to BUNDLE. Nodes return to float until the end-to-end "
                                   "decision agreement with fp32 reaches --target-agreement. Fidelity against fp32 on --eval "
                                   "(or the unused calibration images) is printed and stored in the manifest. "
                                   "Exit status 3 when the target or the --gate was not reached.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--calib", required=True, type=Path, help="folder of calibration images (or labels.csv + images/)")
    p.add_argument("--precision", default="int8", choices=["int8", "fp16", "int8_dynamic"],
                   help="int8: static QDQ (CPU, ORT-GPU, TensorRT); fp16: GPU/TensorRT; int8_dynamic: CPU only")
    p.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales instead of per-channel")
    p.add_argument("--target-agreement", type=float, default=0.99,
                   help="decision agreement with fp32 to reach; the most sensitive nodes go back to float (default 0.99)")
    p.add_argument("--no-fallback", action="store_true", help="keep every node in INT8 whatever the agreement")
    p.add_argument("--format", default="qdq", choices=["qdq", "qoperator"], help="ONNX form of the int8 graph (qdq for TensorRT)")
    p.add_argument("--activation-type", default="uint8", choices=["uint8", "int8"],
                   help="uint8 asymmetric (fast on x86 CPUs) or int8 symmetric (what TensorRT takes)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "modelopt"],
                   help="modelopt: TensorRT-oriented QDQ placement by nvidia-modelopt (needs --activation-type int8)")
    p.add_argument("--sensitivity-seconds", type=float, default=60.0, help="time budget of the per-node sensitivity, per stage")
    p.add_argument("--max-images", type=int, default=64, help="calibration images to sample (seeded, stratified)")
    p.add_argument("--windows-per-image", type=int, default=None, metavar="N",
                   help="windows (or tiles) of each calibration image kept per stage for the INT8 ranges, a seeded "
                        "sample (default: 256 calibration inputs spread evenly over the images)")
    p.add_argument("--for-cpu", default=None, choices=list(KERNEL_CLASSES),
                   help="int8 kernel class of the CPU the int8 graphs are for (`edgederm doctor` prints a device's); "
                        "default: this CPU's. avx2 (x86 without VNNI) and sse get 7-bit weights, which cannot saturate "
                        "there; see docs/int8-and-cpus.md")
    _target_option(p, "lint the new graphs for this device profile afterwards (exit status 1 on findings).")
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out folder for the fidelity report; labelled (labels.csv + images/): the temperature "
                        "and review thresholds are refitted for the new graphs on it, and --gate is measured on it")
    p.add_argument("--gate", default=None,
                   help="clinical metric changes against fp32 the graphs must keep on --eval, as deployed, e.g. "
                        "\"sensitivity[melanoma]>=-0.01,auroc>=-0.005,ece<=+0.01\"; below it nodes return to float; "
                        "exit status 3 with the table when it cannot be met")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="clinical metrics of a bundle on labelled data, per precision and subgroup, "
                                        "with an HTML report",
                       description="Run BUNDLE through the runtime (the code a device runs, tiling included) on DATA (any "
                                   "layout the dataset readers know) and report per-class sensitivity, specificity, PPV, "
                                   "NPV, F1, AUROC with bootstrap 95%% intervals, ECE and a reliability diagram, Brier, "
                                   "referral figures, Dice/IoU/HD95 for segmenters, subgroups (--by) with the largest gap "
                                   "flagged, and every precision side by side. Finished cases are kept in "
                                   "REPORT/cases/: an interrupted run resumes where it stopped.")
    p.add_argument("bundle", type=Path)
    p.add_argument("data", type=Path, help="labelled dataset folder or CSV (edgederm, ham10000, isic, pad_ufes_20, ...)")
    p.add_argument("--precision", default="all", help="all (default) or a comma list: fp32,int8,...")
    p.add_argument("--by", default="", help="subgroup fields, comma separated: metadata fields (site,sex,age) "
                                            "and/or skin_tone (Fitzpatrick from the metadata, else ITA from the image)")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for report.html, evaluation.json, the plots and the resumable cases "
                        "(default: evaluation-<bundle name>)")
    p.add_argument("--workers", type=int, default=1, help="processes predicting in parallel (default 1)")
    p.add_argument("--malignant", default=None,
                   help="malignant class names, comma separated (default: the bundle's, e.g. melanoma)")
    p.add_argument("--layout", default="auto", help="dataset layout (default: detected)")
    p.add_argument("--backend", default="auto", help="runtime backend (default auto)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="predict on a Ray cluster with Ray Data (auto, ray://host:10001, or local); --workers actors. "
                        "Image paths must be readable on every node. pip install 'edgederm[ray]'")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench-precision", help="CPU benchmark: window encoder fp32 vs INT8 forms (QDQ/QOperator, U8S8/S8S8, dynamic) vs PyTorch",
                       description="RemixFormer++'s window encoder (ViT-S/16, 256 px windows) exported and quantized in every "
                                   "CPU form; windows/s, speed-up over ONNX Runtime fp32, decision agreement of a linear probe "
                                   "and embedding cosine against fp32; PyTorch fp32 and bf16 autocast as references.")
    p.add_argument("--out", type=Path, default=None, help="folder for the graphs (default: a temporary folder)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--calib-images", type=int, default=8, help="synthetic 2x2-window images for calibration")
    p.add_argument("--eval-images", type=int, default=32, help="synthetic 2x2-window images for agreement")
    p.add_argument("--seconds", type=float, default=6.0, help="timing per variant")
    p.add_argument("--variant", action="append", help="only this variant (repeatable); ort_fp32 always runs")
    p.add_argument("--small", action="store_true", help="a small encoder (smoke test), not ViT-S")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a trained RemixFormer++ checkpoint folder: benchmark its window encoder (default: seeded random ViT-S)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_precision)

    p = sub.add_parser("profile", help="per-node CPU profile of a bundle's graphs, per precision: where INT8 time goes",
                       description="Run each stage of BUNDLE with ONNX Runtime's profiler under the runtime's session "
                                   "options and group node time by operator: int8 kernels (QLinearConv, QGemm, ...), "
                                   "quantize/dequantize passes, layout transposes, float ops; plus the operators of the "
                                   "graph ONNX Runtime optimised. Shares of a profiled run, not latencies (see bench).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", default=None, help="comma-separated precisions (default: every one the bundle holds)")
    p.add_argument("--batch", type=int, default=None, help="batch per run (default: the tile batch of a tiled stage, else 1)")
    p.add_argument("--runs", type=int, default=5, help="profiled runs after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's, min(2, cores))")
    p.add_argument("--top", type=int, default=15, help="operators listed per table (default 15)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("predict", help="run a bundle on an image file",
                       description="Load BUNDLE (hashes verified) and predict IMAGE. No torch needed.")
    p.add_argument("bundle", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--metadata", help='JSON text or file, e.g. \'{"age": 54, "sex": "female", "site": "back"}\'')
    _add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print label, probabilities, review, backend, precision, timings as JSON")
    p.add_argument("--overlay", type=Path, default=None, metavar="PNG", help="write the mask outline and heatmap over the image (segmenters)")
    _add_trust_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="latency, tiles/s, peak memory and GFLOP/s per image size, against PyTorch eager and MONAI",
                       description="Benchmark BUNDLE on synthetic images of each --sizes side; each size and engine in its own "
                                   "process (honest peak RSS). Peers (torch eager; MONAI sliding_window_inference for "
                                   "segmenters) need the same weights: --checkpoint CKPT.")
    p.add_argument("bundle", type=Path, nargs="?", help="the bundle (not with --all-models / --models)")
    p.add_argument("--sizes", default="1024,2048,4096", help="comma-separated image sides in pixels (default 1024,2048,4096)")
    p.add_argument("--checkpoint", type=Path, default=None, help="training checkpoint of the bundle's model (for the torch/MONAI peers)")
    p.add_argument("--torch-model", default=None, metavar="MODULE:CALLABLE",
                   help="build the peers' torch model with this callable (a model outside the registry); weights from --checkpoint if given")
    p.add_argument("--peers", default="torch,monai", help="comma-separated peers: torch, monai; or none")
    _add_runtime_options(p, backend=False)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: min(2, cores))")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write latency and memory against megapixels")
    p.add_argument("--json", nargs="?", const=True, default=None, type=Path, metavar="PATH",
                   help="print the full report as JSON (--all-models: write it to PATH)")
    p.add_argument("--all-models", action="store_true",
                   help="every zoo family at paper size with seeded weights, SDK precisions vs PyTorch eager/bf16/"
                        "compile, whole pipeline, round robin; matmul peaks and cold start (docs/benchmarks.md)")
    p.add_argument("--models", default=None, metavar="A,B", help="with or instead of --all-models: these registered models")
    p.add_argument("--work", type=Path, default=Path("bench-work"),
                   help="--all-models: folder for checkpoints, bundles, inputs (reused when they match; default bench-work)")
    p.add_argument("--rounds", type=int, default=3, help="--all-models: timed rounds per engine (median; default 3)")
    p.add_argument("--size", type=int, default=None, help="--all-models: dermoscopy side for every model (default: per model)")
    p.add_argument("--calib-images", type=int, default=4, help="--all-models: calibration images for quantize (default 4)")
    p.add_argument("--torch-engines", default="torch:fp32,torch:bf16,torch:compile",
                   help="--all-models: the PyTorch peers (default torch:fp32,torch:bf16,torch:compile; none for none)")
    p.add_argument("--quantize", default="int8,int8_dynamic", choices=["int8,int8_dynamic", "int8", "int8_dynamic", "none"], metavar="P,Q|none",
                   help="--all-models: precisions `quantize` adds when the cached bundle lacks them (none: benchmark "
                        "what the bundles hold)")
    p.add_argument("--no-cold-start", action="store_true", help="--all-models: skip the cold-start processes")
    _add_trusted_key(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("build", help="build TensorRT engines for this device's GPU from a bundle (needs TensorRT)",
                       description="Build one TensorRT engine per stage from BUNDLE's ONNX graphs on this machine's GPU "
                                   "(int8: explicit quantization from the QDQ graph), in a child process, and record "
                                   "GPU, compute capability, TensorRT version and profile shapes in the manifest.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", default="fp16", choices=["fp16", "int8"])
    p.add_argument("--workspace", default=None, help="TensorRT workspace limit, e.g. 512MiB (default: from --memory-budget, else 1GiB)")
    p.add_argument("--memory-budget", default=None, help="device memory budget, e.g. 3.5GiB: sets workspace, tactic memory and the tile batch")
    p.add_argument("--dla", type=int, default=None, metavar="N", help="build for DLA core N (Orin NX / AGX Orin), GPU fallback on")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="DIR", help="timing-cache folder (default ~/.cache/edgederm/tensorrt)")
    p.add_argument("--calibration-cache", type=Path, default=None, help="TensorRT 8.5 implicit INT8 from this calibration cache")
    p.add_argument("--strongly-typed", action="store_true", help="TensorRT 10: types from the graph, no precision flags")
    p.add_argument("--json", action="store_true", help="print the new manifest entries as JSON")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("keygen", help="make a signing key pair (and optionally a graph encryption key)",
                       description="Write DIR/signing-key.pem (private, 0600) and DIR/signing-key.pub (pin it on devices). "
                                   "Elliptic-curve keys, the OpenSSF model-signing key format.")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--curve", default="P-256", choices=["P-256", "P-384", "P-521"])
    p.add_argument("--graph-key", action="store_true", help="also write DIR/graph.key for `edgederm encrypt`")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign every file of a bundle (OpenSSF model-signing format) -> BUNDLE/model.sig",
                       description="Sign BUNDLE with an elliptic-curve private key. The signature covers every file, the "
                                   "manifest included; it verifies with model_signing's own verifier. Needs "
                                   "pip install 'edgederm[sign]'.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", required=True, type=Path, help="private key PEM (from `edgederm keygen`)")
    p.add_argument("--password", default=None, help="password of an encrypted private key")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="check a bundle's signature against pinned public keys",
                       description="Refuse (exit 2) unless BUNDLE/model.sig is by a pinned key and covers exactly the "
                                   "bundle's files. Reads bytes only; no graph is parsed.")
    p.add_argument("bundle", type=Path)
    _add_trusted_key(p, required=True)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("encrypt", help="encrypt a bundle's graphs (AES-256-GCM) in place",
                       description="Replace every ONNX graph by an AES-256-GCM ciphertext bound to its file name and the "
                                   "manifest. The runtime decrypts into memory only (load(..., key_provider=...)).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key-file", required=True, help="32-byte key file (hex or raw), or env:VAR")
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("selftest", help="run (or add) a bundle's golden self-test on this device's backend",
                       description="`selftest BUNDLE`: run the stored golden inputs through every stage and precision on "
                                   "this device and refuse (exit 2) any output outside its tolerance. `selftest add "
                                   "BUNDLE`: compute goldens from the bundle's fp32 graphs and store them.")
    p.add_argument("action", nargs="?", choices=["run", "add"], default="run")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", default=None, help="only this precision (default: every one the bundle holds)")
    p.add_argument("--backend", default="auto", help="auto | onnxruntime-cpu | onnxruntime-cuda | tensorrt")
    p.add_argument("--json", action="store_true")
    _add_trust_options(p, audit=False)
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("audit", help="check an audit log's hash chain",
                       description="`audit verify LOG`: check the hash chain through LOG and its rotated files "
                                   "(LOG.1, LOG.2, ...); exit 2 naming the first edited, deleted, inserted or moved line.")
    p.add_argument("action", choices=["verify"])
    p.add_argument("log", type=Path)
    p.add_argument("--partial", action="store_true", help="accept a chain that starts mid-way (rotation dropped old files)")
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("store", help="A/B bundle store: install, status, rollback, mark-good, gc",
                       description="`store install BUNDLE --store DIR` verifies the signature (with --trusted-key), copies "
                                   "into the inactive slot, self-checks it there and switches the active pointer "
                                   "atomically; the previous bundle stays as the rollback target.")
    p.add_argument("action", choices=["install", "status", "rollback", "mark-good", "gc"])
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="bundle to install (install only)")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--trial", action="store_true", help="install as trial: rolled back at the next load unless marked good")
    _add_trust_options(p, audit=False)
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("serve", help="serve a bundle on the KServe v2 / Triton protocol (HTTP and gRPC)",
                       description="Serve BUNDLE (or the active bundle of --store) to any KServe v2 / Triton client "
                                   "(tritonclient, C, Java, ...) on HTTP and gRPC. Loopback only unless --allow-remote "
                                   "with a bearer token. See docs/serving.md.")
    p.add_argument("bundle", type=Path, nargs="?", default=None)
    p.add_argument("--store", type=Path, default=None, metavar="DIR", help="serve this A/B store's active bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one; -1: no gRPC)")
    p.add_argument("--uds", default=None, metavar="PATH", help="also serve HTTP on this Unix socket (owner-only)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (needs a token)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the bearer token clients must send (else $EDGEDERM_SERVE_TOKEN)")
    p.add_argument("--name", default=None, help="model name in the protocol (default: the bundle's model name)")
    _add_runtime_options(p)
    p.add_argument("--workers", type=int, default=1, help="predictions run at once (default 1)")
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait; one more gets 429 (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run (default 60)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--max-image-side", type=int, default=16384, help="largest image side in px (default 16384)")
    p.add_argument("--max-image-pixels", type=int, default=64_000_000, help="largest image area in px (default 64e6)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM")
    # Two flags rather than argparse.BooleanOptionalAction (3.9+): serve runs on the device's Python 3.8.
    p.add_argument("--access-log", dest="access_log", action="store_true", default=True,
                   help="one JSON line per request on stderr (default on)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no access log")
    _add_trust_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-triton", help="write a Triton model repository from a bundle",
                       description="Write REPO: each stage graph as an onnxruntime (and tensorrt_plan where an engine "
                                   "exists) model with its config.pbtxt, and the whole pipeline as a Python-backend "
                                   "model that runs the EdgeDerm runtime. See docs/serving.md.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, metavar="REPO")
    p.add_argument("--name", default=None, help="pipeline model name (default: the bundle's model name)")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (instance_group count)")
    p.add_argument("--kind", default="KIND_CPU", choices=["KIND_CPU", "KIND_GPU"], help="instance kind of the stage models")
    p.add_argument("--precision", default="fp32", help="graph precision of the stage models and the pipeline")
    p.add_argument("--overwrite", action="store_true", help="replace REPO's models of the same names")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_export_triton)

    p = sub.add_parser("lint", help="will a target's TensorRT parser take every graph of a bundle? (no TensorRT needed)",
                       description="Check every node of every graph in BUNDLE against the onnx-tensorrt operator table of "
                                   "the target's TensorRT release, graph input types, dynamic shapes, opset, non-ONNX "
                                   "domains and INT8 Q/DQ placement. Each finding names graph, node, op, target and the fix. "
                                   "Exit status 0: no findings; 1: findings; 2: the bundle or target cannot be read.")
    p.add_argument("bundle", type=Path)
    _target_option(p, "the device profile whose TensorRT parser to check against.", required=True)
    p.add_argument("--precision", action="append", help="only graphs of this precision (repeatable; default all)")
    p.add_argument("--json", action="store_true", help="print every finding as JSON")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("doctor", help="what this machine can run: backends, GPU, memory; why a bundle would not run here",
                       description="Report Python, numpy, OpenCV, ONNX Runtime providers, torch/TensorRT availability, CPU "
                                   "features and memory; on a Jetson the Jetson Linux release (/etc/nv_tegra_release), the "
                                   "TensorRT and CUDA installed and the target profiles of that release. With --bundle / "
                                   "--target, every mismatch with the bundle's target and engines (exit status 1 if any).")
    p.add_argument("--bundle", type=Path, default=None, help="check this bundle's target and TensorRT engines against this device")
    _target_option(p, "check this device against a target profile.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("plan", help="predict a bundle's peak memory on a target device and the tile batch that fits",
                       description="Predict the peak of the target's (unified) memory for one image: runtime and "
                                   "activations from the bundle's measured memory profile, weights from its graph files, "
                                   "CUDA context and TensorRT workspace from the target profile (figures from its "
                                   "sources, not measured here), and the largest tile batch under the budget (the "
                                   "target's memory less its OS's share, or --memory-budget).")
    p.add_argument("bundle", type=Path)
    _target_option(p, "the device to plan for.", required=True)
    p.add_argument("--size", type=_image_size, default=(2048, 2048), help="image size, N or HxW px (default 2048)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"],
                   help="the graphs the device runs (default fp16)")
    p.add_argument("--memory-budget", default=None, help="plan under this budget instead, e.g. 2.5GiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("models", help="list registered models: task, modalities, parameters, GMACs, stages",
                       description="Table of the model zoo. Paper-size variants only with --all (building them takes a few seconds).")
    p.add_argument("pattern", nargs="?", default="*", help="glob on names, e.g. 'cfformer*'")
    p.add_argument("--all", action="store_true", help="include paper-size variants")
    p.add_argument("--no-macs", action="store_true", help="skip the GMAC count")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


# Short device-side commands: their library warnings are held until the answer is
# printed (predict's are also in Result.notes) and dropped with a refusal, so a refusal
# is one stderr line. Long release-side work (train, export, quantize ...) logs live.
_DEFERRED_WARNINGS = ("predict", "verify", "selftest", "store", "audit", "encrypt", "sign", "plan", "lint")


@contextlib.contextmanager
def _native_stderr_held(replay: Callable[[], bool]) -> Iterator[None]:
    """Hold what native libraries write to file descriptor 2 (libpng warnings, OpenCV and
    ONNX Runtime logs) and replay it at the end only when ``replay()`` says so. Python's
    own ``sys.stderr`` keeps writing to the terminal."""
    try:
        sys.stderr.flush()
        saved: int | None = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (an embedding host): nothing to hold
        saved = None
    if saved is None:
        yield
        return
    python_stderr = sys.stderr
    terminal = None
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        if _writes_to_fd2(python_stderr):
            terminal = open(saved, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            sys.stderr = terminal
        try:
            yield
        finally:
            if terminal is not None:
                sys.stderr = python_stderr
                terminal.close()  # closefd=False: the descriptor stays open for the restore below
            os.dup2(saved, 2)
            os.close(saved)
            if replay():
                held.seek(0)
                text = held.read().decode("utf-8", errors="replace")
                if text:
                    print(text, end="", file=sys.stderr)


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return int(stream.fileno()) == 2
    except (AttributeError, OSError, ValueError):
        return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status = 1
    with _native_stderr_held(lambda: args.verbose or status != 2):
        # Made inside, so that it writes to the terminal and not to the held descriptor.
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        deferred = (logging.handlers.MemoryHandler(1 << 20, flushLevel=logging.CRITICAL + 1, target=stream)
                    if args.command in _DEFERRED_WARNINGS and not args.verbose else None)
        handler = deferred or stream
        root = logging.getLogger()
        saved_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
        logging.captureWarnings(True)  # numpy RuntimeWarnings and the like follow the logging policy above
        try:
            require_release_python(args.command)
            status = int(args.func(args) or 0)
        except EdgeDermError as exc:
            status = 2
            if deferred is not None:
                deferred.buffer.clear()
            print(f"edgederm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        except KeyboardInterrupt:
            status = 130
            print(f"edgederm {args.command}: interrupted", file=sys.stderr)
        finally:
            handler.flush()
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(saved_level)
            handler.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
