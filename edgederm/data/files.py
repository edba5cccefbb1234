"""Finding a dataset's files: sorted, link-safe folder walks and images by id."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# The order in which <folder>/<id>.<ext> is tried when a table names an image by id.
ID_EXTENSIONS = (".jpg", ".png", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SKIP_DIRS = {"__MACOSX", ".git", ".ipynb_checkpoints"}


def walk(root: Path, max_depth: int) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk, sorted, pruned below ``max_depth`` folder levels (-1: no limit)."""
    base = len(root.parts)
    seen: set[str] = set()
    # Symbolic links are followed (datasets are often linked in from a shared disk);
    # each real folder is visited once, so a link cycle cannot loop.
    for current, dirs, files in os.walk(root, followlinks=True):
        here = Path(current)
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        # The caller sees every sub-folder of the deepest level; the walk stops there.
        yield here, list(dirs), sorted(f for f in files if not f.startswith("."))
        if 0 <= max_depth <= len(here.parts) - base:
            dirs[:] = []


def find_files(root: Path, predicate: Callable[[str], bool], max_depth: int) -> list[Path]:
    return [here / f for here, _, files in walk(root, max_depth) for f in files if predicate(f)]


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def subdirs(root: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".") and e.name not in SKIP_DIRS)
    except OSError:
        return []


def find_by_id(folder: Path, image_id: str) -> Path | None:
    """``folder/<image_id>.<ext>`` for the first extension of ID_EXTENSIONS that exists."""
    return next((p for p in (folder / f"{image_id}{ext}" for ext in ID_EXTENSIONS) if p.is_file()), None)


def describe_folder(root: Path) -> str:
    """What a folder holds, for an error message that says what was found."""
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        return f"nothing readable ({exc})"
    if not entries:
        return "nothing (it is empty)"
    shown = [e + ("/" if (root / e).is_dir() else "") for e in entries[:12]]
    more = f" and {len(entries) - 12} more" if len(entries) > 12 else ""
    return f"{len(entries)} entries: {', '.join(shown)}{more}"


class ImageIndex:
    """Image files below a folder by file stem (first in sorted path order wins)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_stem: dict[str, Path] = {}
        self.duplicates = 0
        for here, _, files in walk(root, -1):
            for name in files:
                if not is_image(name):
                    continue
                stem = Path(name).stem
                if stem in self.by_stem:
                    self.duplicates += 1
                else:
                    self.by_stem[stem] = here / name

    def find(self, image_id: str) -> Path | None:
        return self.by_stem.get(Path(image_id).stem if is_image(image_id) else image_id)
