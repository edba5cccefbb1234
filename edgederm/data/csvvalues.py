"""CSV cells -> Python values, one rule for every reader of labelled tables."""
from __future__ import annotations

from typing import Any


def parse_csv_value(value: str) -> Any:
    """'' -> None (missing is its own category), numbers -> int/float, anything else as text."""
    if value == "":
        return None
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value
