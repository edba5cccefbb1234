"""Turn onnx-tensorrt's ``docs/operators.md`` of one release into the lint's data file.

Usage (from a clone of https://github.com/onnx/onnx-tensorrt)::

    git show 8.5-GA:docs/operators.md > ops.md
    python scripts/onnx_tensorrt_table.py ops.md --tensorrt 8.5 --release 8.5-GA \
        --commit $(git rev-parse 8.5-GA) --out export/parser_tables/tensorrt-8.5.json

``--amend FILE`` applies a JSON list of changes a later release's changelog states
(for releases whose own table is not published separately); each change keeps its source.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

REPOSITORY = "https://github.com/onnx/onnx-tensorrt"
TYPE_NAMES = {"FP32": "FLOAT", "FLOAT32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16"}


def _types(cell: str) -> list[str]:
    return [TYPE_NAMES.get(t.strip(), t.strip()) for t in cell.split(",") if t.strip()]


def parse_operators_md(text: str) -> dict[str, Any]:
    opset = re.search(r"up to Opset (\d+)", text, re.I)
    opset_range = re.search(r"range of opset (\d+) to opset (\d+)", text, re.I)
    if opset_range:
        min_opset, max_opset = int(opset_range.group(1)), int(opset_range.group(2))
    elif opset:
        min_opset, max_opset = 1, int(opset.group(1))
    else:
        raise SystemExit("no opset statement found in the table's header")
    types_line = re.search(r"following ONNX data types: ([^\n]+)", text)
    data_types = _types(types_line.group(1).replace(" and ", ", ")) if types_line else []
    notes = [line.lstrip("> ").strip() for line in text.splitlines() if line.startswith("> Note")]
    operators: dict[str, Any] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) < 2 or not cells[0][:1].isupper() or cells[0] == "Operator":
            continue
        supported = cells[1].upper().startswith("Y")
        operators[cells[0]] = {
            "supported": supported,
            "types": _types(cells[2]) if len(cells) > 2 else [],
            "restrictions": re.sub(r"\s+", " ", cells[3].replace("<br />", " ")).strip() if len(cells) > 3 else "",
        }
        if "EXPERIMENTAL" in cells[1].upper():
            operators[cells[0]]["experimental"] = True
    return {"min_opset": min_opset, "max_opset": max_opset, "data_types": data_types, "notes": notes,
            "operators": operators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("operators_md", type=Path)
    parser.add_argument("--tensorrt", required=True, help="TensorRT version the table describes, e.g. 8.5")
    parser.add_argument("--release", required=True, help="onnx-tensorrt branch or tag the file was read from")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--amend", type=Path, default=None, help="JSON list of {operator, set, source} changes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    table = parse_operators_md(args.operators_md.read_text(encoding="utf-8"))
    data: dict[str, Any] = {
        "tensorrt": args.tensorrt,
        "source": {"repository": REPOSITORY, "release": args.release, "commit": args.commit, "file": "docs/operators.md",
                   "url": f"{REPOSITORY}/blob/{args.commit}/docs/operators.md"},
        **table,
        "amendments": [],
    }
    if args.amend:
        for change in json.loads(args.amend.read_text(encoding="utf-8")):
            data["operators"].setdefault(change["operator"], {}).update(change["set"])
            data["amendments"].append(change)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(data['operators'])} operators, opset {data['min_opset']}..{data['max_opset']}")


if __name__ == "__main__":
    main()
