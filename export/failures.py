"""Why torch could not export a module, in the user's terms: the op or the line, and the fix.

torch.onnx's own messages are written for torch developers (three steps, issue
templates, debug environment variables). The two failures a team meets with its own
model are recognised here and raised as typed errors:

- data-dependent control flow (a Python ``if`` on a tensor's value, ``.item()``,
  ``nonzero``): :class:`DataDependentControlFlowError`, naming the source line;
- an op without an ONNX translation: :class:`UnsupportedOperatorError`, naming it.

Anything else keeps torch's message (export/onnx.py).
"""
from __future__ import annotations

import re

from .onnx import ExportError

_NO_ONNX_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")
_UNSUPPORTED = re.compile(r"[Uu]nsupported (?:ONNX )?op(?:erator)?[^'\"]*['\"]([\w.:]+)['\"]")
_DATA_DEPENDENT = ("data-dependent", "GuardOnDataDependentSymNode", "DataDependentOutputException")
_CALL_SITE = re.compile(r'The following call raised this error:\s*\n'
                        r'\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.+)')


class DataDependentControlFlowError(ExportError):
    """The graph would depend on tensor values (an ``if`` on a value, ``.item()``)."""

    def __init__(self, message: str, where: str | None) -> None:
        super().__init__(message)
        self.where = where


class UnsupportedOperatorError(ExportError):
    """An op has no ONNX translation (``op`` is its torch name, e.g. ``aten.special_zeta``)."""

    def __init__(self, message: str, op: str) -> None:
        super().__init__(message)
        self.op = op


def _chain_text(exc: BaseException) -> str:
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def explain_export_failure(stage: str, exc: BaseException) -> ExportError | None:
    """The typed error to raise for ``exc`` (torch's, while exporting ``stage``); None
    when the cause is not one of the two recognised here."""
    text = _chain_text(exc)
    match = _NO_ONNX_FUNCTION.search(text) or _UNSUPPORTED.search(text)
    if match:
        op = match.group(1)
        return UnsupportedOperatorError(
            f"stage {stage!r}: the op {op} has no ONNX translation, so the model cannot be exported. Fix: replace "
            f"it in the model with ops ONNX has (the same maths written with standard tensor ops), or give "
            f"torch.onnx a translation for it (custom_translation_table), export the ONNX file yourself and bring "
            f"it in with `edgederm import`", op)
    if any(marker in text for marker in _DATA_DEPENDENT):
        site = _CALL_SITE.search(text)
        where = f"{site.group(1)}:{site.group(2)} in {site.group(3)}: {site.group(4).strip()}" if site else None
        return DataDependentControlFlowError(
            f"stage {stage!r}: the model's control flow depends on tensor values"
            + (f" ({where})" if where else "")
            + ", which a static graph cannot express. Fix: compute both branches and choose with torch.where, use "
              "torch.cond for real branches, or move the decision out of the exported module (e.g. into "
              "post-processing)", where)
    return None
