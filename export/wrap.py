"""Any PyTorch module as a one-stage EdgeDerm model: :func:`wrap_module`.

A team's own network (timm, torchvision, Hugging Face, segmentation_models_pytorch or
hand-written) declares nothing EdgeDerm needs, so the caller says it: task, input size,
class names, and the modalities its ``forward`` takes (positionally, in the order
dermoscopy, clinical, metadata). The wrapper then is an :class:`EdgeDermModel` with
one stage, and export, parity, quantize and the runtime treat it like a zoo model.

Decisions:

- The bundle always holds logits, because the runtime applies the softmax (with the
  bundle's temperature) itself. A module that ends in probabilities is therefore
  mapped back: ``log p`` for a softmax (``softmax(log p) = p``, so nothing is
  soft-maxed twice) and ``log(p / (1 - p))`` for a sigmoid with one channel.
  Probabilities are recognised when the last leaf module run is a Softmax or
  Sigmoid whose output is the model's output, or (softmax only) when every row of a
  probe's output is non-negative and sums to 1; ``output="probabilities"`` or
  ``"logits"`` overrides the guess.
- Dict, tuple and Hugging Face ``ModelOutput`` results: ``output_key`` picks the
  tensor (a key, an attribute or an index); without it ``logits`` is taken when
  present, else the only or first tensor.
- The output's shape is checked against the declaration on a probe before export,
  so a wrong class list or input size fails with both shapes named, not deep in ONNX.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from edgederm.models.base import EdgeDermModel
from edgederm.runtime.bundle import TASKS
from edgederm.runtime.errors import InputError
from edgederm.runtime.preprocess import PreprocessConfig

from .onnx import ExportError
from .preprocess_from import preprocess_for

OUTPUT_KINDS = ("auto", "logits", "probabilities")
MODALITY_ORDER = ("dermoscopy", "clinical", "metadata")
# Probabilities at exactly 0 or 1 would give infinite logits; the floor keeps every
# value finite and changes the recovered probabilities by far less than float32 noise.
PROBABILITY_FLOOR = 1e-12
SUM_TOLERANCE = 1e-4


def select_output(result: Any, key: str | int | None) -> torch.Tensor:
    """The tensor the bundle keeps from whatever ``forward`` returned."""
    if isinstance(result, torch.Tensor):
        if key is not None:
            raise InputError(f"output_key={key!r} given but the module returns a single tensor; drop output_key")
        return result
    if key is None:
        if _has(result, "logits"):
            key = "logits"
        else:
            tensors = _tensors(result)
            if not tensors:
                raise InputError(f"the module returned {type(result).__name__} with no tensor in it; expected a "
                                 "tensor, a dict/tuple of tensors or a ModelOutput")
            return tensors[0]
    value: Any
    if isinstance(key, int):
        if not isinstance(result, (tuple, list)):
            raise InputError(f"output_key={key} is an index but the module returns {type(result).__name__}; "
                             f"use one of its keys: {_keys(result)}")
        if not -len(result) <= key < len(result):
            raise InputError(f"output_key={key} is out of range for {len(result)} outputs")
        value = result[key]
    elif _has(result, key):
        value = result[key] if isinstance(result, dict) or hasattr(result, "keys") else getattr(result, key)
    else:
        raise InputError(f"output_key={key!r} not found in the module's {type(result).__name__}; "
                         f"available: {_keys(result)}")
    if not isinstance(value, torch.Tensor):
        raise InputError(f"output {key!r} is {type(value).__name__}, not a tensor; choose another output_key "
                         f"from {_keys(result)}")
    return value


def _has(result: Any, key: str) -> bool:
    if isinstance(result, dict) or hasattr(result, "keys"):
        try:
            return key in result.keys() and result[key] is not None
        except Exception:  # noqa: BLE001 - an object with keys() that is not a mapping
            return False
    return isinstance(getattr(result, key, None), torch.Tensor)


def _tensors(result: Any) -> list[torch.Tensor]:
    values = result.values() if hasattr(result, "values") else result if isinstance(result, (tuple, list)) else []
    return [v for v in values if isinstance(v, torch.Tensor)]


def _keys(result: Any) -> list[Any]:
    if hasattr(result, "keys"):
        return list(result.keys())
    if isinstance(result, (tuple, list)):
        return list(range(len(result)))
    return []


class WrappedModel(EdgeDermModel):
    """A user's module with the declarations an EdgeDerm bundle needs (one stage)."""

    def __init__(self, module: nn.Module, *, task: str, input_size: tuple[int, int], class_names: Sequence[str],
                 modalities: Sequence[str] = ("dermoscopy",), metadata_schema: dict | None = None,
                 output_key: str | int | None = None, probabilities: str | None = None,
                 name: str | None = None) -> None:
        names = list(class_names)
        super().__init__(len(names), int(input_size[0]), names)
        self.module = module
        self.task = task
        self.modalities = tuple(modalities)
        self.metadata_schema = metadata_schema
        self.output_key = output_key
        self.probabilities = probabilities  # None (logits), "softmax" or "sigmoid"
        self.preprocess: PreprocessConfig | None = None  # from the module's own config, when it has one
        self._input_size = (int(input_size[0]), int(input_size[1]))
        self.model_name = name or type(module).__name__
        self.model_kwargs = {"wrapped": f"{type(module).__module__}.{type(module).__qualname__}",
                             "output_key": output_key, "output": probabilities or "logits"}

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size

    def sample_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, *self._input_size)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        inputs = {"dermoscopy": self.sample_input(batch)}
        if "clinical" in self.modalities:
            inputs["clinical"] = self.sample_input(batch)
        if "metadata" in self.modalities:
            inputs["metadata"] = torch.rand(batch, self.metadata_dim)
        return inputs

    def raw_output(self, *inputs: torch.Tensor) -> torch.Tensor:
        return select_output(self.module(*inputs), self.output_key)

    def forward(self, dermoscopy: torch.Tensor, second: torch.Tensor | None = None,
                third: torch.Tensor | None = None) -> torch.Tensor:
        # Named parameters, not *inputs: torch.export matches dynamic shapes to them.
        # They take the declared modalities in MODALITY_ORDER.
        out = self.raw_output(*(t for t in (dermoscopy, second, third) if t is not None))
        if self.probabilities == "softmax":
            return torch.log(out.clamp_min(PROBABILITY_FLOOR))
        if self.probabilities == "sigmoid":
            p = out.clamp(PROBABILITY_FLOOR, 1.0 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        return out


def wrap_module(module: nn.Module, *, task: str, input_size: int | Sequence[int], class_names: Sequence[str],
                modalities: Sequence[str] = ("dermoscopy",), metadata_schema: str | dict | None = None,
                output: str = "auto", output_key: str | int | None = None, name: str | None = None) -> WrappedModel:
    """Declare ``module`` as a one-stage EdgeDerm model, checking its output on a probe.

    ``input_size``: (H, W) or one side. ``output``: "auto" (recognise probabilities,
    see the module docstring), "logits" or "probabilities". Segmenters return
    N x K x H x W with K = len(class_names) (K = 1: one lesion channel, sigmoid;
    K > 1: softmax over K, channel 0 background).
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"received {type(module).__name__}; expected a torch.nn.Module (or an EdgeDerm model)")
    if task not in TASKS:
        raise InputError(f"task={task!r}; allowed: {', '.join(repr(t) for t in TASKS)}")
    if output not in OUTPUT_KINDS:
        raise InputError(f"output={output!r}; allowed: {', '.join(repr(k) for k in OUTPUT_KINDS)}")
    size = _size(input_size)
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise InputError(f"class_names={names!r}; expected a non-empty list of distinct names, one per output channel")
    unknown = [m for m in modalities if m not in MODALITY_ORDER]
    if unknown or "dermoscopy" not in modalities:
        raise InputError(f"modalities={list(modalities)!r}; allowed: 'dermoscopy' plus optionally 'clinical', "
                         "'metadata' (the module's forward takes them in that order)")
    if "metadata" in modalities and metadata_schema is None:
        raise InputError("modalities include 'metadata' but no metadata_schema was given; pass the schema "
                         "(fields, categories, encoding: edgederm.runtime.metadata) the module was trained with")
    if metadata_schema is not None:
        from edgederm.runtime.metadata import load_schema

        metadata_schema = load_schema(metadata_schema).to_dict()  # a bundled name or a dict, stored whole
    ordered = [m for m in MODALITY_ORDER if m in modalities]
    wrapped = WrappedModel(module.eval(), task=task, input_size=size, class_names=names, modalities=ordered,
                           metadata_schema=metadata_schema, output_key=output_key, name=name)
    probe = wrapped.example_inputs(2)
    with torch.no_grad(), _LastLeaf(module) as last:
        out = wrapped.raw_output(*probe.values())
    _check_shape(out, task, size, names)
    wrapped.probabilities = _probability_kind(out, task, output, last.kind_for(out))
    own = preprocess_for(module)
    if own is not None and own.input_size != size:
        # The config's normalisation and crop still hold at the size the caller exports.
        own = dataclasses.replace(own, input_size=size)
    wrapped.preprocess = own
    return wrapped


def _size(value: int | Sequence[int]) -> tuple[int, int]:
    sides = [value, value] if isinstance(value, int) else list(value)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise InputError(f"input_size={value!r}; expected (height, width) or one side, positive integers")
    return (sides[0], sides[1])


def _check_shape(out: torch.Tensor, task: str, size: tuple[int, int], names: list[str]) -> None:
    shape = tuple(out.shape)
    if task == "classify":
        if len(shape) != 2 or shape[1] != len(names):
            raise InputError(f"the module's output has shape {list(shape)} on a 2 x 3 x {size[0]} x {size[1]} "
                             f"probe; a classifier must return [batch, {len(names)}] (one score per class name "
                             f"{names}); check class_names, or pick the right output with output_key")
    elif len(shape) != 4 or shape[2:] != size or shape[1] != len(names):
        raise InputError(f"the module's output has shape {list(shape)} on a 2 x 3 x {size[0]} x {size[1]} probe; "
                         f"a segmenter must return [batch, {len(names)}, {size[0]}, {size[1]}] (K = "
                         f"len(class_names) channels at the input size); check class_names and input_size")
    if not out.is_floating_point():
        raise InputError(f"the module's output has dtype {out.dtype}; expected floating point scores")


def _probability_kind(out: torch.Tensor, task: str, output: str, last_leaf: str | None) -> str | None:
    channels = out.shape[1]
    kind = "sigmoid" if channels == 1 else "softmax"
    if output == "logits":
        return None
    if output == "probabilities":
        if channels == 1 and task == "classify":
            raise InputError("output='probabilities' with one class: a classifier needs one score per class")
        return kind
    if last_leaf is not None and (last_leaf == kind):
        return kind
    if channels > 1 and bool((out >= 0).all()):
        sums = out.sum(dim=1)
        if bool(((sums - 1).abs() <= SUM_TOLERANCE).all()):
            return "softmax"
    return None


class _LastLeaf:
    """Records the last leaf module that ran, to see whether a Softmax or Sigmoid module
    produced the model's output (then the output holds probabilities)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.last: tuple[nn.Module, Any] | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> _LastLeaf:
        for sub in self.module.modules():
            if not any(True for _ in sub.children()):
                self.handles.append(sub.register_forward_hook(self._hook))
        return self

    def _hook(self, sub: nn.Module, args: Any, output: Any) -> None:
        self.last = (sub, output)

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def kind_for(self, out: torch.Tensor) -> str | None:
        if self.last is None or self.last[1] is not out:
            return None
        sub = self.last[0]
        if isinstance(sub, nn.Softmax) and sub.dim is not None and sub.dim % out.ndim == 1:
            return "softmax"
        if isinstance(sub, nn.Sigmoid):
            return "sigmoid"
        return None


def as_edgederm_model(model: nn.Module, **declared: Any) -> EdgeDermModel:
    """``model`` itself when it is an EdgeDerm model, else :func:`wrap_module` with the
    declarations (task, input_size, class_names, ...) the caller gave."""
    if isinstance(model, EdgeDermModel):
        given = sorted(k for k, v in declared.items() if v is not None)
        if given:
            raise ExportError(f"{type(model).__name__} is an EdgeDerm model and declares {', '.join(given)} itself; "
                              "drop those arguments")
        return model
    missing = [k for k in ("task", "input_size", "class_names") if declared.get(k) is None]
    if missing:
        raise ExportError(
            f"export_bundle received a plain {type(model).__name__}; to wrap it, also pass {', '.join(missing)} "
            "(e.g. task='classify', input_size=(224, 224), class_names=[...]), or use a registered EdgeDerm model "
            "(edgederm.models.create_model)")
    return wrap_module(model, **{k: v for k, v in declared.items() if v is not None})


def load_factory(spec: str) -> nn.Module:
    """``package.module:callable`` -> the module the callable returns (e.g. a function
    that builds the network and loads its fine-tuned weights)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"--module {spec!r}; expected package.module:factory (a callable returning an nn.Module)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--module {spec!r}: {type(exc).__name__}: {exc}; expected an importable "
                         "package.module:factory (is the package on PYTHONPATH?)") from None
    built = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(built, nn.Module):
        raise InputError(f"--module {spec!r} returned {type(built).__name__}; expected a torch.nn.Module")
    return built
