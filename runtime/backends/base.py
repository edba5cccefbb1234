"""The one small interface every backend implements: loaders make artifacts, runners consume them.

A backend runs one graph: ``run(feed) -> {output name: array}``. It validates the
feed at the public method and delegates to ``_run``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[object, ...]  # ints, or a string for a dynamic axis
    dtype: str


class Backend(ABC):
    """Subclasses fill ``_inputs`` and ``_outputs`` when they open their graph."""

    name: str = "base"
    _inputs: list[TensorInfo]
    _outputs: list[TensorInfo]

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {i.name: i for i in self.inputs}
        missing = set(expected) - set(feed)
        extra = set(feed) - set(expected)
        if missing or extra:
            raise InputError(f"{self.name} feed has inputs {sorted(feed)}; expected {sorted(expected)}")
        for name, info in expected.items():
            array = feed[name]
            if array.dtype != np.dtype(info.dtype):
                raise InputError(f"input {name!r} has dtype {array.dtype}; expected {info.dtype}")
            if len(array.shape) != len(info.shape) or any(
                isinstance(d, int) and d != a for d, a in zip(info.shape, array.shape)
            ):
                raise InputError(f"input {name!r} has shape {array.shape}; expected {info.shape}")
        return self._run(feed)

    @abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def memory_bytes(self) -> int | None:
        """Memory the backend holds beyond the process baseline, when it can tell."""
        return None
