"""The packed folder's on-disk format, shared by its writer (:mod:`.pack`) and its reader
(:mod:`.shards`).

A packed folder holds:

- ``shard-000000.tar``, ...: one sample per record, members named ``<n>.<ext>`` with ``n`` the
  record's index in the source split (nine digits; the reader's key, so no dots in it):
  ``<n>.jpg`` (or ``.png``, ...: the original image bytes and extension), ``<n>.ids`` (the caption's
  token ids up to its attention length, int32 little-endian, no padding), ``<n>.idx`` (``n`` as
  int64 little-endian: the batch's ``index``), ``<n>.txt`` (the caption, UTF-8) and ``<n>.key``
  (the record's key in the source);
- ``shard-000000.idx``: DALI's webdataset index of the shard (``v1.2 <samples>``, then one line per
  sample: ``<ext> <data offset> <size> <member name>`` for each member);
- ``shard-000000.json``: the shard's completion marker (samples, skips, size, mtime and BLAKE2b
  digest of the tar, and one digest per sample, :func:`sample_digest`, by which ``data verify``
  names the samples that changed);
- ``tokenizer/``: the tokenizer the ids come from (``save_pretrained``);
- ``plan.json``: what the folder is made from (source, record count, shard size, tokenizer,
  context length, shuffle seed); a re-run with another plan is refused;
- ``manifest.json``: the plan, counts, tokenizer (name, vocab size, pad id, context length), the
  shard list and the records skipped, per reason: ``skipped`` (the reader's and packing's) and
  ``pack_skipped`` (packing's alone: the samples a loader counts as lost each epoch).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..durable import write_atomic
from .records import DataError

PACK_VERSION = 1
KEY_DIGITS = 9
SHARD_NAME = "shard-{:06d}"
TOKENIZER_DIR = "tokenizer"  # the manifest's tokenizer path, relative to the folder
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif", "img")
JPEG_EXTS = ("jpg", "jpeg")

IndexSample = list[tuple[str, int, int, str]]  # per member: (ext, data offset, size, member name)


@dataclass(frozen=True)
class PackedFolder:
    """The paths of a packed folder (the layout above)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def verified(self) -> Path:
        """Where opening the folder keeps the indices it verified (:mod:`.shards`)."""
        return self.root / ".verified"

    def shard_name(self, shard: int) -> str:
        return SHARD_NAME.format(shard)

    def tar(self, shard: int) -> Path:
        return self.root / f"{self.shard_name(shard)}.tar"

    def index(self, shard: int) -> Path:
        return self.root / f"{self.shard_name(shard)}.idx"

    def marker(self, shard: int) -> Path:
        return self.root / f"{self.shard_name(shard)}.json"

    def marker_of(self, tar_name: str) -> Path:
        """The completion marker of the shard whose tar is ``tar_name``."""
        return self.root / f"{Path(tar_name).stem}.json"


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a packed folder; a folder without one is a :class:`DataError` saying how to make one."""
    path = PackedFolder(Path(folder)).manifest
    if not path.is_file():
        raise DataError(
            f"{path.parent} is not a packed folder (no {path.name}); make one with `unimlip-fast data pack`"
        )
    return json.loads(path.read_text())


def sample_key(index: int) -> str:
    """The member base name of record ``index`` (its members are ``<key>.<ext>``)."""
    return f"{index:0{KEY_DIGITS}d}"


def member_name(index: int, ext: str) -> str:
    """The tar member of record ``index``'s ``ext`` part."""
    return f"{sample_key(index)}.{ext}"


def write_index(path: Path, samples: list[IndexSample]) -> None:
    """DALI's webdataset index (v1.2): ``v1.2 <n>``, then per sample ``ext offset size name`` per member."""
    lines = [f"v1.2 {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in sample) for sample in samples]
    write_atomic(path, "\n".join(lines) + "\n")


def parse_index(path: Path) -> list[IndexSample]:
    """The samples of a webdataset index file (v1.1 or v1.2)."""
    lines = path.read_text().split("\n")
    head = lines[0].split()
    if len(head) != 2 or head[0] not in ("v1.1", "v1.2"):
        raise DataError(f"{path}: not a webdataset index (first line {lines[0]!r})")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        if parts:
            samples.append(
                [(parts[k], int(parts[k + 1]), int(parts[k + 2]), parts[k + 3]) for k in range(0, len(parts), 4)]
            )
    if len(samples) != int(head[1]):
        raise DataError(f"{path}: the header says {head[1]} samples, the file lists {len(samples)}")
    return samples


def sample_digest(parts: dict[str, bytes]) -> str:
    """BLAKE2b-128 of one sample's members (each extension, length and bytes, in extension order)."""
    h = hashlib.blake2b(digest_size=16)
    for ext in sorted(parts):
        h.update(ext.encode() + b"\0" + len(parts[ext]).to_bytes(8, "little") + parts[ext])
    return h.hexdigest()


def ids_in_vocabulary(data: bytes, vocab_size: int) -> bool:
    """Whether ``.ids`` bytes are whole int32 token ids, each in ``[0, vocab_size)``."""
    if not data or len(data) % 4:
        return False
    ids = np.frombuffer(data, "<i4")
    return bool(ids.min() >= 0 and ids.max() < vocab_size)


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """BLAKE2b-128 of a file (about 1 GB/s): tells a copied shard (new mtime) from an edited one."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
