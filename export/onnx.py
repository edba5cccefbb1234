"""torch -> ONNX for every stage a model declares, with a parity check against torch.

Exporter choice (decided, and tested in tests/models/test_models.py): torch's dynamo-based
exporter (``torch.onnx.export(..., dynamo=True)``). The TorchScript-based exporter is
deprecated and fails on shape arithmetic in Swin stages; the dynamo exporter traces
with ``torch.export`` and keeps the batch axis symbolic, so a graph exported with
batch 2 runs with batch 1 and 5. Opset: 18 by default, the dynamo exporter's native
opset (down-conversion fails on Pad for some models, see specs/JETSON.md); TensorRT 10
parses it. JetPack 5 (TensorRT 8.5) needs opset <= 17: pass ``opset=17``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgederm.models.base import ExportStage
from edgederm.runtime.errors import EdgeDermError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class ExportError(EdgeDermError):
    """A model could not be exported, or its ONNX graph does not match torch."""


@dataclass
class ParityReport:
    stage: str
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float  # max |a-b| / (max |b| + eps), over outputs
    passed: bool
    rtol: float

    def to_dict(self) -> dict:
        return {
            "batch_sizes": list(self.batch_sizes), "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff, "passed": self.passed, "rtol": self.rtol,
        }


def export_stage_onnx(stage: ExportStage, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> Path:
    """Export one stage to ``path`` (written through a temp file, then renamed)."""
    path = Path(path)
    module = stage.module.eval()
    names = list(stage.inputs)
    args = tuple(stage.inputs[n] for n in names)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = tuple({axis: batch for axis in stage.dynamic_axes.get(n, {})} or None for n in names)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # The exporter prints progress lines and warnings meant for torch developers;
        # keep them out of the user's terminal unless logging is verbose.
        sink = io.StringIO()
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module, args, input_names=names, output_names=list(stage.outputs),
                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
                    external_data=False, optimize=True, verify=False,
                )
                program.save(tmp, external_data=False)
        finally:  # a failed export must not leave torch.onnx's logging silenced
            quiet.setLevel(level)
        log.debug("exporter output for %s: %s", stage.name, sink.getvalue())
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"ONNX export of stage {stage.name!r} failed: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _resize_batch(t: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn((batch, *t.shape[1:]), generator=generator, dtype=t.dtype)
    # Integer inputs (indices, masks): repeat the sample's values.
    reps = (batch + t.shape[0] - 1) // t.shape[0]
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]


def check_parity(
    stage: ExportStage, onnx_path: str | os.PathLike[str], batch_sizes: tuple[int, ...] = (1, 5),
    rtol: float = 1e-4, seed: int = 0, inputs: dict[str, torch.Tensor] | None = None,
) -> ParityReport:
    """Run torch and ONNX Runtime on the same inputs; relative error against ``rtol``.

    Batch sizes other than the export batch prove no batch size was baked in.
    ``inputs`` replaces the random inputs (e.g. real images); its batch is used as is.
    """
    from edgederm.runtime.backends.onnxruntime import cpu_session

    session = cpu_session(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    worst_abs, worst_rel = 0.0, 0.0
    feeds = [inputs] if inputs is not None else [
        {n: _resize_batch(t, b, generator) for n, t in stage.inputs.items()} for b in batch_sizes
    ]
    module = stage.module.eval()
    for feed in feeds:
        with torch.no_grad():
            expected = module(*feed.values())
        expected_list = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(list(stage.outputs), {n: t.numpy() for n, t in feed.items()})
        for name, exp, out in zip(stage.outputs, expected_list, got):
            exp_np = exp.numpy()
            if exp_np.shape != out.shape:
                raise ExportError(f"stage {stage.name!r} output {name!r}: ONNX shape {out.shape}, torch {exp_np.shape}")
            diff = float(np.abs(exp_np - out).max()) if exp_np.size else 0.0
            scale = float(np.abs(exp_np).max()) if exp_np.size else 0.0
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / (scale + 1e-12))
    sizes = tuple(next(iter(f.values())).shape[0] for f in feeds)
    return ParityReport(stage.name, sizes, worst_abs, worst_rel, worst_rel <= rtol, rtol)
