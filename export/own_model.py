"""The command line of the two ways in for a model from outside the zoo:
``edgederm export --module pkg.mod:factory`` and ``edgederm import MODEL.onnx``."""
from __future__ import annotations

import argparse
from typing import Any

from edgederm.runtime.errors import InputError
from edgederm.runtime.preprocess import PreprocessConfig

from .preprocess_from import explicit, preprocess_from


def parse_hw(text: str | None) -> tuple[int, int] | None:
    """``224`` -> (224, 224); ``256x192`` (or ``256,192``) -> (256, 192)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) <= 0:
        raise InputError(f"--input-size {text!r}; expected a side or HxW, e.g. 224 or 256x192")
    return (sides[0], sides[-1])


def parse_list(text: str | None, what: str, number: bool = False) -> list[Any] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if number:
        try:
            values = [float(t) for t in items]
        except ValueError:
            values = []
        if len(values) != 3:
            raise InputError(f"--{what} {text!r}; expected three numbers R,G,B on the 0..1 scale, "
                             "e.g. 0.485,0.456,0.406")
        return values
    if not items:
        raise InputError(f"--{what} {text!r}; expected comma-separated names, e.g. nevus,melanoma,bcc")
    return items


def _preprocess(args: argparse.Namespace, input_size: tuple[int, int] | None) -> PreprocessConfig | None:
    mean, std = parse_list(args.mean, "mean", True), parse_list(args.std, "std", True)
    if args.preprocess_from is not None:
        if mean is not None or std is not None:
            raise InputError("give --preprocess-from or --mean/--std, not both")
        config = preprocess_from(args.preprocess_from)
        if input_size is not None and config.input_size != input_size:
            import dataclasses

            config = dataclasses.replace(config, input_size=input_size)
        return config
    if mean is None and std is None:
        return None
    if input_size is None:
        raise InputError("--mean/--std need --input-size")
    return explicit(input_size, mean, std)


def export_module_cli(args: argparse.Namespace) -> int:
    from .bundle import export_bundle
    from .wrap import load_factory

    if (args.model is None) == (args.module is None):
        raise InputError("give either MODEL (a checkpoint folder or registered name) or --module pkg.mod:factory")
    missing = [f"--{k}" for k, v in (("task", args.task), ("input-size", args.input_size), ("classes", args.classes))
               if v is None]
    if missing:
        raise InputError(f"--module needs {', '.join(missing)} (e.g. --task classify --input-size 224 "
                         "--classes nevus,melanoma)")
    size = parse_hw(args.input_size)
    export_bundle(load_factory(args.module), args.out, task=args.task, input_size=size,
                  class_names=parse_list(args.classes, "classes"), output=args.output or "auto",
                  output_key=int(args.output_key) if args.output_key and args.output_key.lstrip("-").isdigit()
                  else args.output_key, preprocess=_preprocess(args, size), opset=args.opset,
                  verify=not args.no_verify, overwrite=args.overwrite, progress=print, target=args.target)
    return 0


def import_cli(args: argparse.Namespace) -> int:
    from .onnx_import import import_onnx

    if args.classes is None:
        raise InputError("edgederm import needs --classes (names in output order, e.g. nevus,melanoma)")
    size = parse_hw(args.input_size)
    preprocess = _preprocess(args, size) if args.preprocess_from else None
    import_onnx(args.onnx, args.out, task=args.task, class_names=parse_list(args.classes, "classes") or [],
                preprocess=preprocess, mean=parse_list(args.mean, "mean", True), std=parse_list(args.std, "std", True),
                input_size=size, output_name=args.output, overwrite=args.overwrite, progress=print)
    return 0
