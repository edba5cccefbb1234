"""An existing ONNX file as a bundle: ``edgederm import MODEL.onnx --out BUNDLE``.

Graphs come from many exporters (torch's TorchScript-based and dynamo exporters,
tf2onnx, ...), so nothing is assumed; every property the runtime relies on is checked
or made true, and the result is a normal bundle that quantize, lint, build, sign and
the runtime accept:

1. ``onnx.checker`` and shape inference (strict: an inconsistent graph is refused).
2. One image input, float32, rank 4. Layout: NCHW when axis 1 is 3, NHWC when axis 3
   is 3 (NCHW wins for 3x?x?x3). An NHWC graph gets a Transpose in front of its input,
   so the runtime always feeds NCHW and needs no layout code.
3. The batch axis is made dynamic when it is fixed at 1: Reshape targets that start
   with the batch (a constant 1) are changed to 0 ("copy this dimension"), then the
   graph is run on a batch of 2 and each row must equal the row run alone. When it
   is not equal the batch stays fixed at 1 and the runtime feeds one image/tile at a
   time (tiling batch 1).
4. One run in ONNX Runtime on CPU. An op ORT lacks is refused
   (:class:`~edgederm.export.failures.UnsupportedOperatorError`, naming the op).
5. A final Softmax (or Sigmoid with one channel) is cut off: the runtime applies the
   softmax itself, with the bundle's temperature.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgederm.runtime.bundle import TASKS
from edgederm.runtime.errors import InputError
from edgederm.runtime.preprocess import PreprocessConfig
from edgederm.runtime.staging import make_staging

from .bundle import finish_bundle
from .failures import UnsupportedOperatorError
from .onnx import ExportError
from .preprocess_from import explicit

log = logging.getLogger(__name__)

BATCH = "batch"
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
ROW_TOLERANCE = 1e-4  # relative; batch-2 rows against the same rows run alone


def _onnx() -> Any:
    import onnx

    return onnx


def _dims(value_info: Any) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def _check(model: Any, path: Path) -> Any:
    onnx = _onnx()
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        message = str(exc)
        if "No Op registered for" in message:
            op = message.split("No Op registered for", 1)[1].split()[0]
            raise UnsupportedOperatorError(
                f"{path}: the op {op} is not an ONNX standard op at this opset; re-export the model without it "
                "or with a standard replacement", op) from None
        raise ExportError(f"{path} is not a valid ONNX graph: {message.splitlines()[0]}; re-export it") from None
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for inconsistent graphs
        if _custom_ops(model):
            return model  # shapes of custom ops are unknown to onnx; ORT decides below
        raise ExportError(f"{path}: shape inference failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          "the graph is inconsistent, re-export it") from None


def _custom_ops(model: Any) -> list[str]:
    return sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def _image_input(model: Any, path: Path) -> Any:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); `edgederm import` "
                         "takes graphs with one image input; export models with metadata inputs from PyTorch "
                         "(export_bundle with modalities=...)")
    image = inputs[0]
    elem = image.type.tensor_type.elem_type
    if elem != _onnx().TensorProto.FLOAT:
        name = _onnx().TensorProto.DataType.Name(elem)
        raise InputError(f"{path}: input {image.name!r} is {name}; the runtime feeds float32 normalised pixels. "
                         "Re-export the model with a float32 input (normalisation outside the graph)")
    if len(_dims(image)) != 4:
        raise InputError(f"{path}: input {image.name!r} has shape {_dims(image)}; expected an image batch of rank 4 "
                         "(N, 3, H, W) or (N, H, W, 3)")
    return image


def _layout(dims: list[int | str | None], path: Path) -> str:
    if dims[1] == 3:
        return "NCHW"
    if dims[3] == 3:
        return "NHWC"
    raise InputError(f"{path}: input shape {dims} has no axis of 3 colour channels at position 1 (NCHW) or 3 (NHWC); "
                     "expected an RGB image input")


def _set_dims(value_info: Any, dims: Sequence[int | str]) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        new = shape.dim.add()
        if isinstance(d, int):
            new.dim_value = d
        else:
            new.dim_param = d


def _to_nchw(model: Any, image: Any, height: int, width: int) -> str:
    """Put a Transpose (NCHW -> NHWC) in front of the graph's NHWC input."""
    onnx = _onnx()
    nchw_name = f"{image.name}_nchw"
    nchw = onnx.helper.make_tensor_value_info(nchw_name, onnx.TensorProto.FLOAT, [_dims(image)[0] or BATCH, 3,
                                                                                   height, width])
    transpose = onnx.helper.make_node("Transpose", [nchw_name], [image.name], perm=[0, 2, 3, 1],
                                      name="edgederm_nchw_to_nhwc")
    graph = model.graph
    graph.node.insert(0, transpose)
    index = list(graph.input).index(image)
    graph.input.remove(image)
    graph.input.insert(index, nchw)
    return nchw_name


def _free_batch(model: Any) -> None:
    """Input and outputs get a symbolic batch; Reshape targets starting with a constant
    1 copy the batch instead (0 in ONNX Reshape). Intermediate shapes are dropped and
    inferred again."""
    graph = model.graph
    for value in list(graph.input[:1]) + list(graph.output):
        dims = _dims(value)
        if dims and dims[0] in (1, None):
            _set_dims(value, [BATCH, *[d if d is not None else f"d{i}" for i, d in enumerate(dims[1:], 1)]])
    del graph.value_info[:]
    constants = {i.name: i for i in graph.initializer}
    produced = {o: n for n in graph.node for o in n.output}
    numpy_helper = _onnx().numpy_helper
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        target = constants.get(node.input[1])
        source = produced.get(node.input[1])
        if target is not None:
            values = numpy_helper.to_array(target)
            if values.ndim == 1 and values.size and values[0] == 1:
                values = values.copy()
                values[0] = 0
                target.CopyFrom(numpy_helper.from_array(values, target.name))
        elif source is not None and source.op_type == "Constant":
            attr = source.attribute[0]
            values = numpy_helper.to_array(attr.t)
            if values.ndim == 1 and values.size and values[0] == 1:
                values = values.copy()
                values[0] = 0
                attr.t.CopyFrom(numpy_helper.from_array(values, attr.t.name))


def _session(model_bytes: bytes, path: Path, custom: list[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/NotImplemented/InvalidGraph types
        message = str(exc)
        op = custom[0] if custom else _op_in(message)
        if op:
            raise UnsupportedOperatorError(
                f"{path}: ONNX Runtime has no kernel for the op {op} ({message.strip().splitlines()[0][:300]}). "
                "Fix: re-export the model with standard ONNX ops (or register the op as an ONNX Runtime custom "
                "op and TensorRT plugin; the SDK does not load custom op libraries)", op) from None
        raise ExportError(f"{path}: ONNX Runtime cannot load the graph: {message.strip()[:500]}") from None


def _op_in(message: str) -> str | None:
    for marker in ("implementation for ", "is not a registered function/op", "No Op registered for "):
        if marker in message:
            if marker.startswith("is not"):
                return message.split(marker)[0].rsplit(" ", 2)[-2].strip()
            return message.split(marker, 1)[1].split("(")[0].split()[0]
    return None


def _run(session: Any, batch: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    output = session.get_outputs()[0].name
    return np.asarray(session.run([output], {name: batch})[0])


def _strip_probabilities(model: Any, output: Any) -> str | None:
    """Cut a final Softmax (axis 1 or last) or Sigmoid; return what was cut."""
    graph = model.graph
    producer = next((n for n in graph.node if output.name in n.output), None)
    if producer is None or producer.op_type not in ("Softmax", "Sigmoid"):
        return None
    consumers = [n for n in graph.node if output.name in n.input]
    if consumers:
        return None
    if producer.op_type == "Softmax":
        axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
        rank = len(_dims(output))
        if axis % max(rank, 1) != 1:
            return None
    logits = producer.input[0]
    graph.node.remove(producer)
    for node in graph.node:  # the output keeps its name: rename the producer's input
        node.output[:] = [output.name if o == logits else o for o in node.output]
        node.input[:] = [output.name if i == logits else i for i in node.input]
    return producer.op_type


def import_onnx(
    path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, task: str, class_names: Sequence[str],
    preprocess: PreprocessConfig | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    input_size: tuple[int, int] | None = None, output_name: str | None = None, clinical: dict[str, Any] | None = None,
    overwrite: bool = False, profile_memory: bool = True, progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> Path:
    """Check ``path``, adapt it (layout, batch, final softmax) and write a bundle to ``out_dir``.

    Preprocessing: ``preprocess`` (e.g. :func:`edgederm.export.preprocess_from.preprocess_from`),
    or ``mean``/``std`` with a stretch resize to the graph's input size. ``input_size``
    is needed only when the graph's height and width are not fixed.
    """
    onnx = _onnx()
    src = Path(path)
    say = progress or (lambda msg: log.info(msg))
    if task not in TASKS:
        raise InputError(f"task={task!r}; allowed: {', '.join(repr(t) for t in TASKS)}")
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise InputError(f"class_names={names!r}; expected a non-empty list of distinct names")
    if preprocess is not None and (mean is not None or std is not None):
        raise InputError("give either preprocess (e.g. --preprocess-from) or mean/std, not both")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or choose another --out")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common type
        raise InputError(f"cannot read {src} as ONNX ({type(exc).__name__}: {exc}); "
                         "expected a .onnx model file") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    custom = _custom_ops(model)
    model = _check(model, src)
    image = _image_input(model, src)
    dims = _dims(image)
    layout = _layout(dims, src)
    spatial = dims[2:4] if layout == "NCHW" else dims[1:3]
    if all(isinstance(d, int) for d in spatial):
        size = (int(spatial[0]), int(spatial[1]))  # type: ignore[arg-type]
        if input_size is not None and tuple(input_size) != size:
            raise InputError(f"input_size={tuple(input_size)} but {src} is fixed at {size[0]}x{size[1]}; drop "
                             "input_size or pass the graph's size")
    elif input_size is not None:
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise InputError(f"{src}: input {image.name!r} has no fixed height and width ({dims}); pass input_size "
                         "(CLI: --input-size HxW), the size the model was trained at")
    say(f"{src.name}: opset {opset}, input {image.name} {dims} ({layout}, float32)")
    outputs = list(model.graph.output)
    if output_name is not None:
        chosen = next((o for o in outputs if o.name == output_name), None)
        if chosen is None:
            raise InputError(f"output {output_name!r} not in {src}; outputs: {', '.join(o.name for o in outputs)}")
    elif len(outputs) == 1:
        chosen = outputs[0]
    else:
        chosen = next((o for o in outputs if "logit" in o.name.lower()), None)
        if chosen is None:
            raise InputError(f"{src} has outputs {', '.join(o.name for o in outputs)}; choose one with output_name "
                             "(CLI: --output NAME)")
    for other in [o for o in outputs if o is not chosen]:
        model.graph.output.remove(other)
    input_name = image.name
    if layout == "NHWC":
        input_name = _to_nchw(model, image, *size)
        say("  NHWC input: a Transpose in front makes it NCHW (the runtime's layout)")
    else:
        _set_dims(image, [dims[0] if dims[0] is not None else BATCH, 3, size[0], size[1]])
    cut = _strip_probabilities(model, chosen)
    if cut:
        say(f"  final {cut} removed: the runtime applies the softmax itself")
    fixed = model.SerializeToString()
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((2, 3, *size)).astype(np.float32)
    session = _session(fixed, src, custom)
    single = [_run(session, probe[i:i + 1]) for i in range(2)]
    dynamic = dims[0] not in (1,)
    if not dynamic:
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        _free_batch(candidate)
        try:
            batched = _run(_session(candidate.SerializeToString(), src, custom), probe)
            expected = np.concatenate(single)
            scale = float(np.abs(expected).max()) + 1e-12
            dynamic = (batched.shape == expected.shape
                       and float(np.abs(batched - expected).max()) / scale <= ROW_TOLERANCE)
        except Exception as exc:  # noqa: BLE001 - any failure means the batch cannot be freed safely
            log.debug("batch axis stays fixed: %s", exc)
        if dynamic:
            model = candidate
            fixed = model.SerializeToString()
        say("  batch axis: made dynamic (checked: a batch of 2 equals its rows run alone)" if dynamic
            else "  batch axis: fixed at 1 (the graph mixes rows); the runtime feeds one at a time")
    result = single[0]
    _check_output(result, task, names, size, src, chosen.name)
    batch_dim: int | str = BATCH if dynamic else 1
    out_shape = [batch_dim, *[int(d) for d in result.shape[1:]]]
    stage_name = "segmenter" if task == "segment" else "classifier"
    if preprocess is None:
        preprocess = explicit(size, mean, std)
        if mean is None or std is None:
            log.warning("no mean/std given for %s: using 0.5/0.5; pass the model's own (--mean/--std or "
                        "--preprocess-from) or predictions will be silently wrong", src)
    elif preprocess.input_size != size:
        # A library config (e.g. timm's 224) gives normalisation and crop; the graph fixes the size.
        say(f"  preprocess input size {preprocess.input_size} -> the graph's {size}")
        preprocess = dataclasses.replace(preprocess, input_size=size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging(out.parent, f".{out.name}.partial-")
    try:
        graph_file = f"{stage_name}.fp32.onnx"
        (staging / graph_file).write_bytes(fixed)
        stage = {
            "name": stage_name,
            "inputs": [{"name": input_name, "shape": [batch_dim, 3, size[0], size[1]], "dtype": "float32",
                        "source": "dermoscopy"}],
            "outputs": [{"name": chosen.name, "shape": out_shape, "dtype": "float32"}],
            "graphs": {"fp32": {"file": graph_file}},
        }
        tiling = None
        if task == "segment":
            from edgederm.runtime.bundle import DEFAULT_BLEND, DEFAULT_OVERLAP

            tiling = {"tile": size[0], "overlap": DEFAULT_OVERLAP, "blend": DEFAULT_BLEND}
            if not dynamic:
                tiling["batch_size"] = 1
        model_section: dict[str, Any] = {"name": src.stem, "architecture": "imported ONNX", "kwargs": {}, "task": task,
                         "modalities": ["dermoscopy"], "class_names": names, "input_size": list(size),
                         "metadata_schema": None}
        export = {"exporter": "edgederm import", "source": src.name, "opset": opset,
                  "import": {"layout": layout, "batch": "dynamic" if dynamic else "fixed 1", "removed": cut}}
        finish_bundle(staging, out, model=model_section, preprocess=preprocess, stages=[stage], export=export,
                      tiling=tiling, clinical=clinical, extra=None, profile_memory=profile_memory and dynamic, say=say)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out}")
    return out


def _check_output(result: np.ndarray, task: str, names: list[str], size: tuple[int, int], src: Path,
                  name: str) -> None:
    shape = list(result.shape)
    if task == "classify" and (len(shape) != 2 or shape[1] != len(names)):
        raise InputError(f"{src}: output {name!r} has shape {shape}; a classifier with {len(names)} class names "
                         f"must give [batch, {len(names)}]; check --classes or choose the logits with --output")
    if task == "segment" and (len(shape) != 4 or shape[1] != len(names) or tuple(shape[2:]) != size):
        raise InputError(f"{src}: output {name!r} has shape {shape}; a segmenter must give "
                         f"[batch, {len(names)}, {size[0]}, {size[1]}] (one channel per class name)")
    if not np.all(np.isfinite(result)):
        raise ExportError(f"{src}: output {name!r} is not finite on a random input; the graph is broken")
