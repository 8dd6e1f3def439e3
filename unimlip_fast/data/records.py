"""What every reader hands back: its items, what it skipped and where, and the one split vocabulary.

A reader (:mod:`.sources` lists them all) returns an :class:`ItemSet`: the usable items (image-caption
:class:`Record` s, labelled images, question-answer pairs), a :class:`Skips` counter of the rows it
left out per reason with the place of the first of each, and the file it read. Nothing is dropped
silently: a set with nothing left is a :class:`DataError` naming the source and the counts
(:func:`finish`). Skip counts reach the logs and messages through :func:`describe_skips` only.

Splits have one vocabulary (:data:`SPLITS`): ``train``, ``dev`` (also ``val``, ``valid``,
``validate``, ``validation``) and ``test``; ``all`` (or nothing) is every row; any other name is an
error. Each reader maps a canonical name to its release's own file names.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

SPLITS: dict[str, tuple[str, ...]] = {  # canonical split -> the names users and releases give it
    "train": ("train", "training"),
    "dev": ("dev", "val", "valid", "validate", "validation"),
    "test": ("test", "testing"),
}
_SPLIT_OF = {alias: name for name, aliases in SPLITS.items() for alias in aliases}
EVERY_ROW = ("", "all")  # split names that mean every row

T = TypeVar("T")


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

    def add(self, other: Mapping[str, int]) -> None:
        """``other``'s counts added, the first place of each reason kept (this set's first)."""
        for reason, count in other.items():
            self[reason] += count
        for reason, where in getattr(other, "first", {}).items():
            self.first.setdefault(reason, where)


def describe_skips(skipped: Mapping[str, int]) -> str:
    """``"bad_encoding=2 (first: pairs.csv line 7), missing_image=1"``: counts per reason, sorted, with
    where the first one was when known; ``""`` when nothing was skipped."""
    first = getattr(skipped, "first", {})
    return ", ".join(
        f"{k}={v}" + (f" (first: {first[k]})" if k in first else "") for k, v in sorted(skipped.items()) if v
    )


@dataclass(frozen=True, eq=False)
class Record:
    """One image-caption pair."""

    key: str
    caption: str
    image: str | np.ndarray  # a file path, or an in-memory HxWx3 uint8 array (phantom)


@dataclass
class ItemSet(Generic[T]):
    """A reader's result: the usable items in order, the rows skipped, the source read."""

    items: list[T]
    skipped: Skips = field(default_factory=Skips)
    source: str = ""
    labels: tuple[str, ...] = ()  # labelled images: the name of each target position

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def summary(self) -> str:
        """``"1636 items from <source>; skipped: missing_image=3"``, for the log and run summary."""
        return f"{len(self.items)} items from {self.source}; skipped: {describe_skips(self.skipped) or 'none'}"


def finish(items: list, skipped: Skips, source, what: str, hint: str = "", labels: tuple[str, ...] = ()) -> ItemSet:
    """The readers' one way out: the set, or (nothing usable left) a :class:`DataError` saying of
    ``what`` there is none in ``source`` and what was skipped, then ``hint``."""
    if not items:
        raise DataError(f"no usable {what} in {source} (skipped: {describe_skips(skipped) or 'no rows at all'}){hint}")
    return ItemSet(items, skipped, str(source), tuple(labels))


def join_item_sets(parts: list[ItemSet]) -> ItemSet:
    """The items of ``parts`` in order, their skips added (the first place of each reason kept)."""
    skipped = Skips()
    for part in parts:
        skipped.add(part.skipped)
    return ItemSet(
        [item for part in parts for item in part.items],
        skipped,
        " + ".join(p.source for p in parts),
        parts[0].labels if parts else (),
    )


def canonical_split(split: str | None) -> str | None:
    """``"val"``/``"validation"`` -> ``"dev"`` and so on; ``None``/``""``/``"all"`` -> ``None`` (every row);
    a name outside the vocabulary is a :class:`DataError`."""
    if split is None or split.strip().lower() in EVERY_ROW:
        return None
    name = _SPLIT_OF.get(split.strip().lower())
    if name is None:
        aliases = "; ".join(f"{name}: {', '.join(a)}" for name, a in SPLITS.items())
        raise DataError(f"unknown split {split!r}; the splits are train, dev and test ({aliases}), or all")
    return name


def split_named(value) -> str | None:
    """The canonical split a row's split cell names (``"Validation"`` -> ``"dev"``); None for a cell
    that names none of them."""
    return _SPLIT_OF.get(str(value).strip().lower())


def one_split(split: str | None, source: str) -> str:
    """The canonical split of a reader that reads one split at a time (``all`` is an error)."""
    name = canonical_split(split)
    if name is None:
        raise DataError(f"{source} is read one split at a time: give train, dev or test, not {split!r}")
    return name
