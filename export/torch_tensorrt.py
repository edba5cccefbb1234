"""torch-TensorRT: compile an EdgeDerm model's stages for users who stay in PyTorch.

``compile_torch_tensorrt(model, out_dir)`` compiles each export stage with
``torch_tensorrt.compile(..., ir="dynamo")`` and saves it with
``torch_tensorrt.save(..., output_format="exported_program")``; load one with
``torch.export.load(path).module()``. This path is for training-side users (a GPU
workstation, a Jetson with PyTorch); the device runtime uses the bundle's engines
(export/tensorrt.py) and never torch.

Decisions:
- stages, not the whole model: the same graphs and dynamic batch the ONNX bundle
  has, so both paths are compared stage by stage;
- dynamic batch 1..``max_batch`` through ``torch_tensorrt.Input(min, opt, max)``;
  other dimensions static, as in the ONNX graphs;
- fp16: ``enabled_precisions`` where the installed torch-TensorRT still takes it
  (it was deprecated in favour of explicit typing), with explicit typing turned off
  so the flag applies; otherwise the model and inputs are cast to half. Inputs and
  outputs stay fp32 in the first case;
- torch_tensorrt is imported on first use with an install hint.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

from edgederm.runtime.errors import InputError
from edgederm.runtime.optional import optional_import

PRECISIONS = ("fp32", "fp16")


def compile_torch_tensorrt(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    max_batch: int = 4,
    workspace: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Compile every export stage of ``model`` (an EdgeDerm model) and save each as an ExportedProgram.

    Returns ``{stage name: path}``. Needs a CUDA GPU, torch and torch-TensorRT.
    """
    torch = optional_import("torch", "torch-TensorRT compilation")
    torch_tensorrt = optional_import("torch_tensorrt", "compiling with torch-TensorRT")
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported for torch-TensorRT; choose one of {', '.join(PRECISIONS)}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch {max_batch!r} must be a positive integer")
    if not torch.cuda.is_available():
        raise InputError("torch-TensorRT needs a CUDA GPU and torch.cuda.is_available() is False; "
                         "run on a GPU machine, or use `edgederm build` on the device")
    if not hasattr(model, "export_stages"):
        raise InputError(f"compile_torch_tensorrt takes an EdgeDerm model (edgederm.models.create_model); "
                         f"got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accepted = set(inspect.signature(torch_tensorrt.dynamo.compile).parameters)
    saved: dict[str, Path] = {}
    model = model.eval().cuda()
    for stage in model.export_stages():
        module = stage.module.eval().cuda()
        specs, examples = [], []
        for name, tensor in stage.inputs.items():
            shape = tuple(tensor.shape[1:])
            dtype = tensor.dtype
            if precision == "fp16" and "enabled_precisions" not in accepted and dtype == torch.float32:
                dtype = torch.float16
            specs.append(torch_tensorrt.Input(min_shape=(1, *shape), opt_shape=(max_batch, *shape),
                                              max_shape=(max_batch, *shape), dtype=dtype, name=name))
            examples.append(tensor[:1].to(device="cuda", dtype=dtype).expand(max_batch, *shape).contiguous())
        options: dict[str, Any] = {"min_block_size": 1}
        if precision == "fp16":
            if "enabled_precisions" in accepted:
                options["enabled_precisions"] = {torch.float16, torch.float32}
                if "use_explicit_typing" in accepted:
                    options["use_explicit_typing"] = False
            else:
                module = module.half()
        if workspace is not None and "workspace_size" in accepted:
            options["workspace_size"] = int(workspace)
        say(f"compiling stage {stage.name} with torch-TensorRT {torch_tensorrt.__version__} ({precision}, batch 1..{max_batch})")
        with torch.no_grad():
            compiled = torch_tensorrt.compile(module, ir="dynamo", inputs=specs, **options)
        path = out / f"{stage.name}.{precision}.trt.ep"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch_tensorrt.save(compiled, str(tmp), output_format="exported_program", inputs=examples)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        say(f"  saved {path} (load: torch.export.load(path).module())")
        saved[stage.name] = path
    return saved
