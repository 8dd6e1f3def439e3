"""Image-caption data sets -> records.

Every reader returns a :class:`RecordSet`: the usable ``(key, caption, image)`` records and a
counter of the rows it skipped, per reason. Nothing is dropped silently; a data set with nothing
left is an error that names the path and the skip counts.

Skip reasons: ``missing_image`` (no file with that name, whatever the extension), ``outside_root``
(an image path leaving the image folder: ``../`` or an absolute path elsewhere), ``empty_caption``,
``nan_caption`` (NaN, None or a missing caption field), ``bad_row`` (unparseable line, wrong field
count, no image field), ``no_split`` (``data.split_key`` set and the row's split cell empty),
``bad_encoding`` (a row with bytes that are not UTF-8; a byte-order mark is fine), ``duplicate_row``
(csv/jsonl: the same image and caption again). The first row skipped for each reason is kept
(file and line, or the path looked for) for the messages.

Images are found by name whatever the extension: each folder is listed once with ``os.scandir`` into
a ``stem -> file`` table, so the MedPix copy here (JPEG) matches the release's PNG names.
"""
from __future__ import annotations

import collections
import csv
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DATA_FORMATS, DataConfig

SKIP_REASONS = ("missing_image", "outside_root", "empty_caption", "nan_caption", "bad_row", "no_split",
                "bad_encoding", "duplicate_row")
_SPLIT_ALIASES = {  # canonical split -> the names users type for it
    "train": ("train", "training"),
    "dev": ("dev", "val", "valid", "validation"),
    "test": ("test", "testing"),
}


class DataError(ValueError):
    """A data set that cannot be read, or has nothing usable left."""


class Skips(collections.Counter):
    """Skipped rows per reason, and where the first of each was (for the messages)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first: dict[str, str] = {}

    def note(self, reason: str, where: str = "") -> None:
        self[reason] += 1
        if where and reason not in self.first:
            self.first[reason] = where

    def describe(self) -> str:
        """``"bad_encoding=2 (first: pairs.csv line 7), missing_image=1 (first: /data/a.png)"``."""
        return ", ".join(f"{k}={v}" + (f" (first: {self.first[k]})" if k in self.first else "")
                         for k, v in sorted(self.items()) if v)


@dataclass(frozen=True, eq=False)
class Record:
    key: str
    caption: str
    image: str | np.ndarray  # a file path, or an in-memory HxWx3 uint8 array (phantom)


@dataclass
class RecordSet:
    records: list[Record]
    skipped: collections.Counter = field(default_factory=Skips)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def summary(self) -> str:
        """``"1636 records from <source>; skipped: missing_image=3"``, for the log and run summary."""
        skipped = describe_skips(self.skipped) or "none"
        return f"{len(self.records)} records from {self.source}; skipped: {skipped}"


def describe_skips(skipped) -> str:
    """Counts per reason, with where the first one was when known."""
    if isinstance(skipped, Skips):
        return skipped.describe()
    return ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()) if v)


def canonical_split(split: str | None) -> str | None:
    """``"val"``/``"validation"`` -> ``"dev"`` and so on; ``None``/``""``/``"all"`` -> ``None``."""
    if split is None or split.strip().lower() in ("", "all"):
        return None
    s = split.strip().lower()
    for name, aliases in _SPLIT_ALIASES.items():
        if s in aliases:
            return name
    return s


# ---------------------------------------------------------------------------------------- captions


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


# ------------------------------------------------------------------------------------------ images


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


def _add(records: list[Record], skipped: Skips, index: ImageIndex, key, caption_value, image_ref, where: str = ""):
    caption, reason = clean_caption(caption_value)
    if reason:
        skipped.note(reason, where)
        return
    if image_ref is None or (isinstance(image_ref, float) and math.isnan(image_ref)) or not str(image_ref).strip():
        skipped.note("bad_row", where)
        return
    if not index.inside(str(image_ref)):
        skipped.note("outside_root", f"{where}: {image_ref}" if where else str(image_ref))
        return
    path = index.find(str(image_ref))
    if path is None:
        skipped.note("missing_image", str(index.resolve(str(image_ref))))
        return
    records.append(Record(key=str(key), caption=caption, image=path))


def _finish(records: list[Record], skipped: Skips, source) -> RecordSet:
    rs = RecordSet(records=records, skipped=skipped, source=str(source))
    if not records:
        counts = describe_skips(skipped) or "no rows at all"
        hint = ""
        if set(k for k, v in skipped.items() if v) <= {"missing_image", "outside_root"}:
            hint = ("; every image is missing or outside the image folder: set data.image_root to the folder "
                    "the image paths are relative to")
        raise DataError(f"no usable image-caption pairs in {source} (skipped: {counts}){hint}")
    return rs


def _has_bad_bytes(text: str) -> bool:
    """Bytes that are not UTF-8, read with ``errors="surrogateescape"``, show up as lone surrogates."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _iter_jsonl(path: Path, skipped: Skips):
    """Rows of a JSONL file with ``_line`` (1-based); bad lines are counted with where they are."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            if _has_bad_bytes(line):
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


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    return path


# ----------------------------------------------------------------------------------------- readers


def read_medpix(path: str | os.PathLike, split: str | None = "train") -> RecordSet:
    """MedPix-2.0 release layout: ``splitted_dataset/descriptions_{train,dev,test}.jsonl`` or, for
    split ``all``/``None``, ``Descriptions.json``; caption ``Description.Caption``; ``images/``."""
    root = _require(Path(path), "MedPix-2.0 folder")
    split = canonical_split(split)
    if split is None:
        src = _require(root / "Descriptions.json", "MedPix-2.0 Descriptions.json")
        rows = json.loads(src.read_text(encoding="utf-8"))
        skipped = Skips()
    else:
        src = _require(root / "splitted_dataset" / f"descriptions_{split}.jsonl", f"MedPix-2.0 split {split!r}")
        skipped = Skips()
        rows = list(_iter_jsonl(src, skipped))
    index = ImageIndex(root / "images")
    records: list[Record] = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("Description"), dict) or "image" not in row:
            skipped["bad_row"] += 1
            continue
        _add(records, skipped, index, row["image"], row["Description"].get("Caption"), row["image"])
    return _finish(records, skipped, src)


def read_pmc_oa(path: str | os.PathLike, split: str | None = "train", image_root: str = "") -> RecordSet:
    """PMC-OA: a jsonl file, or a folder with ``{split}.jsonl`` (``valid.jsonl`` for dev) or
    ``pmc_oa.jsonl``; rows ``{"image": name, "caption": text}``; images in ``image_root``, else
    ``images/`` beside the jsonl, else the jsonl's own folder."""
    p = _require(Path(path), "PMC-OA path")
    s = canonical_split(split)
    if p.is_dir():
        names = {"dev": ["valid", "val", "dev"], None: []}.get(s, [s])
        # the whole release file stands for the training rows (or all), never for a held-out split
        candidates = [p / f"{n}.jsonl" for n in names] + ([p / "pmc_oa.jsonl"] if s in (None, "train") else [])
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(f"PMC-OA folder {p} has none of {', '.join(c.name for c in candidates)}")
        p = found[0]
    else:
        refuse_held_out_split(p, split, "")
    root = Path(image_root) if image_root else (p.parent / "images" if (p.parent / "images").is_dir() else p.parent)
    index = ImageIndex(root)
    skipped = Skips()
    records: list[Record] = []
    for row in _iter_jsonl(p, skipped):
        if "image" not in row:
            skipped["bad_row"] += 1
            continue
        _add(records, skipped, index, row["image"], row.get("caption"), row["image"])
    return _finish(records, skipped, p)


def read_roco(path: str | os.PathLike, split: str | None = "train", subset: str = "radiology") -> RecordSet:
    """ROCO: ``data/{train,validation,test}/radiology/captions.txt`` with lines ``ROCO_00020\\t <caption>``
    and images ``.../radiology/images/ROCO_00020.*``. ``path`` is the ROCO root or its ``data/``."""
    root = _require(Path(path), "ROCO folder")
    if (root / "data").is_dir():
        root = root / "data"
    s = canonical_split(split) or "train"
    folder = root / {"dev": "validation"}.get(s, s) / subset
    src = _require(folder / "captions.txt", f"ROCO captions for split {split!r}")
    index = ImageIndex(folder / "images")
    skipped = Skips()
    records: list[Record] = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            if not tab or not key.strip():
                skipped["bad_row"] += 1
                continue
            key = key.strip()
            _add(records, skipped, index, key, caption, key)
    return _finish(records, skipped, src)


def _table_file(path: Path, split: str | None, ext: str) -> Path:
    if path.is_dir():
        s = canonical_split(split)
        names = {"dev": ["valid", "val", "dev", "validation"], None: ["all", "data"]}.get(s, [s])
        for n in names:
            if (path / f"{n}.{ext}").is_file():
                return path / f"{n}.{ext}"
        raise DataError(f"{path} is a folder without {' / '.join(f'{n}.{ext}' for n in names)}")
    return path


def refuse_held_out_split(path: Path, split: str | None, split_key: str) -> None:
    """One file without a split column is training data: asking it for another split is an error,
    never the same rows labelled test."""
    if split_key or canonical_split(split) in (None, "train"):
        return
    raise DataError(f"{path} is one file with no split, so split {split!r} would be the training rows again: "
                    f"set data.split_key to the column naming each row's split (--split-key), give a folder "
                    f"holding train{path.suffix} and {split}{path.suffix}, or read every row with split all")


def in_split(row: dict, split_key: str, split: str | None) -> bool | None:
    """Whether ``row`` belongs to ``split`` by its ``split_key`` column; None when it names no split."""
    value = row.get(split_key)
    if value is None or not str(value).strip():
        return None
    return split is None or canonical_split(str(value)) == split


def read_table(
    path: str | os.PathLike,
    fmt: str,
    image_key: str = "image",
    caption_key: str = "caption",
    image_root: str = "",
    split: str | None = None,
    split_key: str = "",
) -> RecordSet:
    """Generic ``csv`` or ``jsonl``: chosen image and caption columns; image paths relative to
    ``image_root``, else to the file's folder. A folder path means ``{split}.{csv,jsonl}`` inside it.
    ``split_key``: the column naming each row's split (train/dev/test and their aliases); rows of
    other splits are left out, rows naming none are counted as ``no_split``. One file without it is
    the training set: any other split is an error."""
    p = _table_file(_require(Path(path), f"{fmt} path"), split, fmt)
    if not Path(path).is_dir():
        refuse_held_out_split(p, split, split_key)
    wanted = canonical_split(split)
    index = ImageIndex(Path(image_root) if image_root else p.parent)
    skipped = Skips()
    records: list[Record] = []
    if fmt == "jsonl":
        rows = _iter_jsonl(p, skipped)
    else:
        f = open(p, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(f)
        missing = [k for k in (image_key, caption_key, split_key) if k and k not in (reader.fieldnames or [])]
        if missing:
            f.close()
            raise DataError(f"{p}: no column {missing[0]!r}; columns are {reader.fieldnames}")
        rows = ({**r, "_line": reader.line_num} for r in reader)
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        where = f"{p.name} line {row.pop('_line')}"
        ragged = fmt == "csv" and (None in row or None in row.values())  # too many / too few fields
        if ragged or image_key not in row:
            skipped.note("bad_row", where)
            continue
        if fmt == "csv" and any(_has_bad_bytes(v) for v in row.values() if isinstance(v, str)):
            skipped.note("bad_encoding", where)
            continue
        if split_key:
            member = in_split(row, split_key, wanted)
            if member is None:
                skipped.note("no_split", where)
            if not member:
                continue
        ref = row[image_key]
        pair = (str(ref), str(row.get(caption_key)))
        if pair in seen:
            skipped.note("duplicate_row", where)
            continue
        seen.add(pair)
        _add(records, skipped, index, ref if isinstance(ref, str) else i, row.get(caption_key), ref, where)
    if fmt == "csv":
        f.close()
    return _finish(records, skipped, p)


def read_records(cfg: DataConfig, split: str | None = None) -> RecordSet:
    """The records of ``cfg.format`` at ``cfg.path``; ``split`` overrides ``cfg.split``. Splits joined
    with ``+`` (``dev+test``) are read one after the other into one set, in that order."""
    split = cfg.split if split is None else split
    if split and "+" in split:
        return join_record_sets([read_records(cfg, part.strip()) for part in split.split("+")])
    fmt = cfg.format
    if fmt == "phantom":
        from .phantom import phantom_split

        return phantom_split(cfg.phantom_size, split)
    if not cfg.path:
        raise DataError(f"data.path is required for data.format={fmt}")
    if fmt == "medpix":
        return read_medpix(cfg.path, split)
    if fmt == "pmc-oa":
        return read_pmc_oa(cfg.path, split, cfg.image_root)
    if fmt == "roco":
        return read_roco(cfg.path, split)
    if fmt in ("csv", "jsonl"):
        return read_table(cfg.path, fmt, cfg.image_key, cfg.caption_key, cfg.image_root, split, cfg.split_key)
    raise DataError(f"unknown data format {fmt!r}; one of {', '.join(DATA_FORMATS)}")


def join_record_sets(parts: list[RecordSet]) -> RecordSet:
    """The records of ``parts`` in order, their skips added (the first place of each reason kept)."""
    skipped = Skips()
    for part in parts:
        for reason, count in part.skipped.items():
            skipped[reason] += count
        for reason, where in getattr(part.skipped, "first", {}).items():
            skipped.first.setdefault(reason, where)
    return RecordSet([r for part in parts for r in part.records], skipped, " + ".join(p.source for p in parts))


def roco_eval_subset(path: str | os.PathLike, n: int = 2000, min_words: int = 3, seed: int = 42,
                     subset: str = "radiology") -> RecordSet:
    """ROCO's 2,000-pair retrieval test set as published (M3AE's ``prepro_irtr_roco``, on which
    PMC-CLIP and Uni-Mlip report): one RNG seeded with 42; the raw lines of the train, validation
    and test ``captions.txt`` shuffled in that order (each shuffle moves the RNG on, so the chosen
    pairs depend on all three files); then, in the test lines' shuffled order, those with two
    tab-separated fields and a caption of at least ``min_words`` words (whitespace collapsed), the
    first ``n``. Pairs whose image is missing are skipped and counted after the choice, not
    replaced, so the set stays the published one. ``path``: the ROCO root or its ``data/``."""
    root = _require(Path(path), "ROCO folder")
    if (root / "data").is_dir():
        root = root / "data"
    rng = random.Random(seed)
    for split in ("train", "validation", "test"):
        src = _require(root / split / subset / "captions.txt", f"ROCO captions for split {split!r}")
        lines = src.read_text(encoding="utf-8").strip().split("\n")
        rng.shuffle(lines)
    chosen = []
    for line in lines:  # the test split's, shuffled
        fields = line.strip().split("\t")
        if len(fields) == 2 and len(fields[1].split()) >= min_words:
            chosen.append((fields[0], " ".join(fields[1].split())))
            if len(chosen) == n:
                break
    index = ImageIndex(root / "test" / subset / "images")
    skipped = Skips()
    records: list[Record] = []
    for key, caption in chosen:
        _add(records, skipped, index, key, caption, key)
    return _finish(records, skipped, src)
