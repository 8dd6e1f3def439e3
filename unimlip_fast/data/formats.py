"""Image-caption data sets -> records.

Every reader returns an :class:`.records.ItemSet` of :class:`.records.Record` s (``key, caption,
image``) and the rows it skipped, per reason (:mod:`.records`); :mod:`.sources` finds the reader of
each ``data.format``.

Skip reasons: ``missing_image`` (no file with that name, whatever the extension), ``outside_root``
(an image path leaving the image folder: ``../`` or an absolute path elsewhere), ``empty_caption``,
``nan_caption`` (NaN, None or a missing caption field), ``bad_row`` (unparseable line, wrong field
count, no image field), ``no_split`` (``data.split_key`` set and the row's split cell empty),
``bad_encoding`` (a row with bytes that are not UTF-8; a byte-order mark is fine), ``duplicate_row``
(csv/jsonl: the same image and caption again). The first row skipped for each reason is kept
(file and line, or the path looked for) for the messages.

Images are found by name whatever the extension (:class:`.reading.ImageIndex`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path

from .reading import ImageIndex, clean_caption, has_bad_bytes, iter_jsonl, require_path
from .records import DataError, ItemSet, Record, Skips, canonical_split, finish, split_named


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


def _pairs(records: list[Record], skipped: Skips, source) -> ItemSet[Record]:
    hint = ""
    reasons = {k for k, v in skipped.items() if v}
    if reasons and reasons <= {"missing_image", "outside_root"}:  # not a file with no rows at all
        hint = (
            "; every image is missing or outside the image folder: set data.image_root to the folder "
            "the image paths are relative to"
        )
    return finish(records, skipped, source, "image-caption pairs", hint)


# ----------------------------------------------------------------------------------------- readers


def read_medpix(path: str | os.PathLike, split: str | None = "train") -> ItemSet[Record]:
    """MedPix-2.0 release layout: ``splitted_dataset/descriptions_{train,dev,test}.jsonl`` or, for
    split ``all``/``None``, ``Descriptions.json``; caption ``Description.Caption``; ``images/``."""
    root = require_path(Path(path), "MedPix-2.0 folder")
    split = canonical_split(split)
    if split is None:
        src = require_path(root / "Descriptions.json", "MedPix-2.0 Descriptions.json")
        rows = json.loads(src.read_text(encoding="utf-8"))
        skipped = Skips()
    else:
        src = require_path(root / "splitted_dataset" / f"descriptions_{split}.jsonl", f"MedPix-2.0 split {split!r}")
        skipped = Skips()
        rows = list(iter_jsonl(src, skipped))
    index = ImageIndex(root / "images")
    records: list[Record] = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("Description"), dict) or "image" not in row:
            where = row.get("_line", number) if isinstance(row, dict) else number
            skipped.note("bad_row", f"{src.name} {'line' if split else 'entry'} {where}")
            continue
        _add(records, skipped, index, row["image"], row["Description"].get("Caption"), row["image"])
    return _pairs(records, skipped, src)


def read_pmc_oa(path: str | os.PathLike, split: str | None = "train", image_root: str = "") -> ItemSet[Record]:
    """PMC-OA: a jsonl file, or a folder with ``{split}.jsonl`` (``valid.jsonl`` for dev) or
    ``pmc_oa.jsonl``; rows ``{"image": name, "caption": text}``; images in ``image_root``, else
    ``images/`` beside the jsonl, else the jsonl's own folder."""
    p = require_path(Path(path), "PMC-OA path")
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
    for row in iter_jsonl(p, skipped):
        if "image" not in row:
            skipped.note("bad_row", f"{p.name} line {row['_line']}")
            continue
        _add(records, skipped, index, row["image"], row.get("caption"), row["image"])
    return _pairs(records, skipped, p)


def read_roco(path: str | os.PathLike, split: str | None = "train", subset: str = "radiology") -> ItemSet[Record]:
    """ROCO: ``data/{train,validation,test}/radiology/captions.txt`` with lines ``ROCO_00020\\t <caption>``
    and images ``.../radiology/images/ROCO_00020.*``. ``path`` is the ROCO root or its ``data/``."""
    root = require_path(Path(path), "ROCO folder")
    if (root / "data").is_dir():
        root = root / "data"
    s = canonical_split(split) or "train"
    folder = root / {"dev": "validation"}.get(s, s) / subset
    src = require_path(folder / "captions.txt", f"ROCO captions for split {split!r}")
    index = ImageIndex(folder / "images")
    skipped = Skips()
    records: list[Record] = []
    with open(src, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            if not tab or not key.strip():
                skipped.note("bad_row", f"{src.name} line {number}")
                continue
            key = key.strip()
            _add(records, skipped, index, key, caption, key)
    return _pairs(records, skipped, src)


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
    raise DataError(
        f"{path} is one file with no split, so split {split!r} would be the training rows again: "
        f"set data.split_key to the column naming each row's split (--split-key), give a folder "
        f"holding train{path.suffix} and {split}{path.suffix}; to evaluate a model trained on other data, "
        f"read every row with split all; a run pretraining on this file evaluates nothing with eval.split="
    )


def in_split(row: dict, split_key: str, split: str | None) -> bool | None:
    """Whether ``row`` belongs to ``split`` by its ``split_key`` column; None when it names no split."""
    value = row.get(split_key)
    if value is None or not str(value).strip():
        return None
    return split is None or split_named(value) == split


def read_table(
    path: str | os.PathLike,
    fmt: str,
    image_key: str = "image",
    caption_key: str = "caption",
    image_root: str = "",
    split: str | None = None,
    split_key: str = "",
) -> ItemSet[Record]:
    """Generic ``csv`` or ``jsonl``: chosen image and caption columns; image paths relative to
    ``image_root``, else to the file's folder. A folder path means ``{split}.{csv,jsonl}`` inside it.
    ``split_key``: the column naming each row's split (train/dev/test and their aliases); rows of
    other splits are left out, rows naming none are counted as ``no_split``. One file without it is
    the training set: any other split is an error."""
    p = _table_file(require_path(Path(path), f"{fmt} path"), split, fmt)
    if not Path(path).is_dir():
        refuse_held_out_split(p, split, split_key)
    wanted = canonical_split(split)
    index = ImageIndex(Path(image_root) if image_root else p.parent)
    skipped = Skips()
    records: list[Record] = []
    if fmt == "jsonl":
        rows = iter_jsonl(p, skipped)
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
        if fmt == "csv" and any(has_bad_bytes(v) for v in row.values() if isinstance(v, str)):
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
    return _pairs(records, skipped, p)


def roco_eval_subset(
    path: str | os.PathLike, n: int = 2000, min_words: int = 3, seed: int = 42, subset: str = "radiology"
) -> ItemSet[Record]:
    """ROCO's 2,000-pair retrieval test set as published (M3AE's ``prepro_irtr_roco``, on which
    PMC-CLIP and Uni-Mlip report): one RNG seeded with 42; the raw lines of the train, validation
    and test ``captions.txt`` shuffled in that order (each shuffle moves the RNG on, so the chosen
    pairs depend on all three files); then, in the test lines' shuffled order, those with two
    tab-separated fields and a caption of at least ``min_words`` words (whitespace collapsed), the
    first ``n``. Pairs whose image is missing are skipped and counted after the choice, not
    replaced, so the set stays the published one. ``path``: the ROCO root or its ``data/``."""
    root = require_path(Path(path), "ROCO folder")
    if (root / "data").is_dir():
        root = root / "data"
    rng = random.Random(seed)
    for split in ("train", "validation", "test"):
        src = require_path(root / split / subset / "captions.txt", f"ROCO captions for split {split!r}")
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
    return _pairs(records, skipped, src)
