"""Question-answer pairs for medical VQA, one answer per question (normalised by :func:`normalize_answer`):
- VQA-RAD: ``trainset.json`` / ``testset.json`` and ``images/``.
- SLAKE: ``train.json`` / ``validate.json`` / ``test.json`` and ``imgs/<img_name>``; English only.

Every reader returns an :class:`.records.ItemSet` of :class:`QAItem` s and the records it skipped
per reason, the first place of each kept (:mod:`.records`); a split with nothing left is a
:class:`.records.DataError` naming the path and the counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .reading import ImageIndex
from .records import DataError, ItemSet, Skips, finish, one_split


@dataclass(frozen=True)
class QAItem:
    image: str
    question: str
    answer: str  # normalised
    answer_type: str  # OPEN or CLOSED


ANSWER_TYPES = ("OPEN", "CLOSED")


def normalize_answer(answer) -> str:
    """Lower case, surrounding and repeated white space removed: ``" Yes "`` -> ``"yes"``; numbers
    (VQA-RAD stores a few answers as integers) become their text."""
    return " ".join(str(answer).split()).lower()


def _qa_item(row, index: ImageIndex, image_key: str, skipped: Skips, where: str) -> QAItem | None:
    if not isinstance(row, dict):
        skipped.note("malformed_record", where)
        return None
    question = row.get("question")
    question = " ".join(question.split()) if isinstance(question, str) else ""
    if not question:
        skipped.note("empty_question", where)
        return None
    answer = row.get("answer")
    answer = normalize_answer(answer) if answer is not None else ""
    if not answer:
        skipped.note("empty_answer", where)
        return None
    answer_type = " ".join(str(row.get("answer_type", "")).split()).upper()
    if answer_type not in ANSWER_TYPES:
        skipped.note("unknown_answer_type", where)
        return None
    ref = row.get(image_key)
    image = index.find(str(ref)) if isinstance(ref, str) and ref.strip() else None
    if image is None:
        skipped.note("missing_image", f"{where}: {ref}")
        return None
    return QAItem(image, question, answer, answer_type)


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of question records")
    return rows


def _questions(items: list[QAItem], skipped: Skips, source: Path, split: str) -> ItemSet[QAItem]:
    return finish(items, skipped, source, f"{split} questions")


def read_vqa_rad(path: str | os.PathLike, split: str) -> ItemSet[QAItem]:
    root = Path(path)
    split = one_split(split, "VQA-RAD")
    if split == "dev":
        raise DataError("VQA-RAD has no validation split (train and test only)")
    src = root / ("trainset.json" if split == "train" else "testset.json")
    index, skipped = ImageIndex(root / "images"), Skips()
    items = [
        it
        for k, row in enumerate(_read_json_list(src))
        if (it := _qa_item(row, index, "image_name", skipped, f"{src.name} record {k + 1}"))
    ]
    return _questions(items, skipped, src, split)


def read_slake(path: str | os.PathLike, split: str) -> ItemSet[QAItem]:
    root = Path(path)
    split = one_split(split, "SLAKE")
    src = root / {"train": "train.json", "dev": "validate.json", "test": "test.json"}[split]
    index, skipped = ImageIndex(root / "imgs" if (root / "imgs").is_dir() else root), Skips()
    items = []
    for k, row in enumerate(_read_json_list(src)):
        where = f"{src.name} record {k + 1}"
        if isinstance(row, dict) and row.get("q_lang", "en") != "en":
            skipped.note("not_english", where)
            continue
        if (item := _qa_item(row, index, "img_name", skipped, where)) is not None:
            items.append(item)
    return _questions(items, skipped, src, split)
