"""What every reader uses: images found by name whatever their extension, JSONL rows with the line
they came from, captions cleaned, and paths that must exist.

Images are found by name whatever the extension: each folder is listed once with ``os.scandir`` into
a ``stem -> file`` table, so the MedPix copy here (JPEG) matches the release's PNG names.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .records import DataError, Skips


def clean_caption(value) -> tuple[str | None, str | None]:
    """``(caption, None)`` with whitespace collapsed, or ``(None, skip_reason)``."""
    if value is None:
        return None, "nan_caption"
    if isinstance(value, float):
        if math.isnan(value):
            return None, "nan_caption"
        value = str(value)
    if not isinstance(value, str):
        value = str(value)
    text = " ".join(value.split())
    if not text:
        return None, "empty_caption"
    if text.lower() in ("nan", "none", "null"):
        return None, "nan_caption"
    return text, None


class ImageIndex:
    """Finds an image file by name whatever its extension; each folder is listed once."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(root))
        self._dirs: dict[Path, tuple[set[str], dict[str, str]]] = {}

    def _listing(self, folder: Path) -> tuple[set[str], dict[str, str]]:
        if folder not in self._dirs:
            names: set[str] = set()
            stems: dict[str, str] = {}
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        if entry.is_file():
                            names.add(entry.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            # Deterministic choice when one stem has several extensions: the first name in order.
            for name in sorted(names, reverse=True):
                stems[os.path.splitext(name)[0]] = name
            self._dirs[folder] = (names, stems)
        return self._dirs[folder]

    def resolve(self, ref: str) -> Path:
        """Where ``ref`` points: relative to the root, or absolute."""
        ref = str(ref).strip()
        return Path(os.path.normpath(ref if os.path.isabs(ref) else self.root / ref))

    def inside(self, ref: str) -> bool:
        """Whether ``ref`` stays inside the root (no ``../`` out of it, no absolute path elsewhere);
        by the path as written, so symbolic links inside the root may point anywhere."""
        path = self.resolve(ref)
        return path == self.root or self.root in path.parents

    def find(self, ref: str) -> str | None:
        """The path of ``ref`` (relative to the root, or absolute), by exact name, then by stem."""
        ref = str(ref).strip()
        if not ref:
            return None
        path = Path(ref) if os.path.isabs(ref) else self.root / ref
        names, stems = self._listing(path.parent)
        name = path.name
        if name in names:
            return str(path)
        for stem in (os.path.splitext(name)[0], name):
            if stem in stems:
                return str(path.parent / stems[stem])
        return None


def has_bad_bytes(text: str) -> bool:
    """Bytes that are not UTF-8, read with ``errors="surrogateescape"``, show up as lone surrogates."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def iter_jsonl(path: Path, skipped: Skips):
    """Rows of a JSONL file with ``_line`` (1-based); bad lines are counted with where they are."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            if has_bad_bytes(line):
                skipped.note("bad_encoding", where)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped.note("bad_row", where)
                continue
            if not isinstance(row, dict):
                skipped.note("bad_row", where)
                continue
            row["_line"] = number
            yield row


def require_path(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    return path
