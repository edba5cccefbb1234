"""CSV/TSV tables and their cells: one rule for every reader of labelled tables."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from edgederm.runtime.errors import InputError


def parse_csv_value(value: str) -> Any:
    """'' -> None (missing is its own category), numbers -> int/float, anything else as text."""
    if value == "":
        return None
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in (",", "\t", ";")}
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def csv_header(path: Path) -> list[str]:
    """The header row of a table; [] when it cannot be read (layout detection only peeks)."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return []
    return [c.strip() for c in next(csv.reader([first], delimiter=_sniff_delimiter(first)), [])]


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV/TSV file; BOM and cell whitespace stripped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter=_sniff_delimiter(first))
            header = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a UTF-8 text table ({exc}); save it as UTF-8 CSV") from None
    if not header:
        raise InputError(f"{path} is empty; expected a header row and one row per image")
    return header, rows
