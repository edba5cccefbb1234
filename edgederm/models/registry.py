"""Model registry: variants registered by name, built with ``create_model(name)``.

A variant is a small function that only sets hyper-parameters (docs/models.md).
``create_model`` records the name and keyword arguments on the model so a checkpoint
(safetensors + JSON) can rebuild exactly the same architecture without pickle.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from edgederm.runtime.errors import EdgeDermError


class UnknownModelError(EdgeDermError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

_REGISTRY: dict[str, "ModelEntry"] = {}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    paper_size: bool
    description: str


def register_model(family: str, paper_size: bool = False) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a variant function under its own name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, family, fn, paper_size, doc[0] if doc else "")
        return fn

    return wrap


_NOT_ARCHITECTURES = {"base", "registry", "summary", "pretrained"}


def _ensure_registered() -> None:
    # Importing the architecture modules (one file per family) registers their variants.
    import importlib
    import pkgutil
    from pathlib import Path

    # the package's folder from this file, not `from . import __path__`: a module importing its own package is a cycle
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.ispkg and info.name not in _NOT_ARCHITECTURES and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def list_models(pattern: str = "*", paper_size: bool | None = None) -> list[str]:
    """Registered variant names matching a glob ``pattern``, sorted."""
    _ensure_registered()
    names = [
        n for n, e in _REGISTRY.items()
        if fnmatch.fnmatch(n, pattern) and (paper_size is None or e.paper_size == paper_size)
    ]
    return sorted(names)


def model_entry(name: str) -> ModelEntry:
    _ensure_registered()
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[0]}*") or sorted(_REGISTRY)
        raise UnknownModelError(f"unknown model {name!r}; registered models include: {', '.join(close)}; see `edgederm models --all`")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered variant; keyword arguments override its defaults."""
    model = model_entry(name).builder(**kwargs)
    model.model_name = name  # type: ignore[assignment]
    model.model_kwargs = dict(kwargs)  # type: ignore[assignment]
    return model
