"""The ``edgederm`` command: one entry point for the whole pipeline.

Each sub-command imports what it needs when it runs, so ``edgederm predict`` and
``edgederm doctor`` work on a device without torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from edgederm.runtime.errors import EdgeDermError


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


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
    from edgederm.models import create_model
    from edgederm.runtime.preprocess import PreprocessConfig
    from edgederm.train import TrainConfig, read_image_folder, train

    probe = create_model(args.model)
    config = PreprocessConfig(input_size=tuple(probe.input_size), color_constancy=args.color_constancy,
                              hair_removal=args.hair_removal)
    print(f"reading {args.data} at {config.input_size[0]}x{config.input_size[1]} ...", file=sys.stderr)
    data = read_image_folder(args.data, config)
    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    _, report = train(data, cfg, out_dir=args.out, preprocess=config)
    print(f"checkpoint written to {args.out} (val accuracy {report['val_accuracy']:.3f})")
    if args.json:
        _print_json(report)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgederm.export import export_bundle
    from edgederm.export.bundle import model_from_checkpoint_or_name

    model, preprocess, clinical = model_from_checkpoint_or_name(args.model)
    export_bundle(model, args.out, preprocess=preprocess, clinical=clinical, opset=args.opset,
                  verify=not args.no_verify, overwrite=args.overwrite, progress=print)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgederm.calibration import quantize_bundle

    report = quantize_bundle(args.bundle, args.calib, precision=args.precision, method=args.method,
                             per_channel=not args.per_tensor, max_images=args.max_images, eval_dir=args.eval, seed=args.seed)
    if args.json:
        _print_json(report)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from edgederm.runtime import load

    metadata = None
    if args.metadata:
        text = Path(args.metadata).read_text() if Path(args.metadata).is_file() else args.metadata
        try:
            metadata = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EdgeDermError(f"--metadata is neither a JSON file nor JSON text ({exc}); example: '{{\"age\": 54, \"sex\": \"female\"}}'") from exc
    model = load(args.bundle, backend=args.backend, precision=args.precision)
    result = model.predict_file(args.image, metadata=metadata)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgederm.doctor import diagnose

    report = diagnose()
    if args.json:
        _print_json(report)
    else:
        for key, value in report.items():
            print(f"{key:<22} {value}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from edgederm.quickstart import run_quickstart

    report = run_quickstart(args.out, n_per_class=args.n_per_class, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)
    if args.json:
        _print_json(report)
    return 0


# -- parser --------------------------------------------------------------------------
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
    p.add_argument("data", type=Path, help="folder with labels.csv and images/")
    p.add_argument("--model", default="hifuse_tiny", help="registered model name (see `edgederm models`)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--color-constancy", choices=["none", "gray_world", "gwsd"], default="none")
    p.add_argument("--hair-removal", action="store_true")
    p.add_argument("--json", action="store_true", help="print the training report as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint or model name -> ONNX bundle, parity checked against PyTorch",
                       description="Export every stage to ONNX (dynamo exporter), check ONNX Runtime against torch at batch 1 and 5, and write a bundle with manifest.json and a sha256 per file.")
    p.add_argument("model", help="checkpoint folder (from `edgederm train`) or a registered model name (random weights)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 default; 17 for TensorRT 8.5 / JetPack 5)")
    p.add_argument("--no-verify", action="store_true", help="skip the torch vs ONNX Runtime parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="add an INT8 graph to a bundle (static QDQ, calibrated)",
                       description="Calibrate on images read through the runtime preprocessing and add INT8 QDQ graphs to BUNDLE. With --eval, report agreement with fp32 on held-out images.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--calib", required=True, type=Path, help="folder of calibration images (or labels.csv + images/)")
    p.add_argument("--precision", default="int8", choices=["int8"])
    p.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales instead of per-channel")
    p.add_argument("--max-images", type=int, default=64, help="calibration images to sample (seeded, stratified)")
    p.add_argument("--eval", type=Path, default=None, help="held-out folder for the fidelity report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("predict", help="run a bundle on an image file",
                       description="Load BUNDLE (hashes verified) and predict IMAGE. No torch needed.")
    p.add_argument("bundle", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--metadata", help='JSON text or file, e.g. \'{"age": 54, "sex": "female", "site": "back"}\'')
    p.add_argument("--backend", default="auto", help="auto | onnxruntime-cpu | onnxruntime-cuda | tensorrt")
    p.add_argument("--precision", default="auto", help="auto | fp32 | int8 (what the bundle holds)")
    p.add_argument("--json", action="store_true", help="print label, probabilities, review, backend, precision, timings as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("doctor", help="what this machine can run: backends, GPU, memory",
                       description="Report Python, numpy, OpenCV, ONNX Runtime providers, torch/TensorRT availability, CPU features and memory.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("models", help="list registered models: task, modalities, parameters, GMACs, stages",
                       description="Table of the model zoo. Paper-size variants only with --all (building them takes a few seconds).")
    p.add_argument("pattern", nargs="?", default="*", help="glob on names, e.g. 'cfformer*'")
    p.add_argument("--all", action="store_true", help="include paper-size variants")
    p.add_argument("--no-macs", action="store_true", help="skip the GMAC count")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgeDermError as exc:
        print(f"edgederm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgederm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
