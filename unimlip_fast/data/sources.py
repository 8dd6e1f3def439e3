"""Every data set the package reads, by name: reading one is a lookup in these tables.

- :data:`PAIR_SOURCES` (``data.format``): image-caption pairs for pretraining, retrieval, packing and
  embedding: MedPix-2.0, PMC-OA, ROCO, a CSV or JSONL table (:mod:`.formats`), the phantom set
  (:mod:`.phantom`); each reader takes the :class:`~unimlip_fast.config.DataConfig` and a split.
- :data:`LABELLED_SOURCES`: labelled images for classification and zero-shot: NIH ChestX-ray14,
  CheXpert, MIMIC-CXR-JPG and a label CSV (:mod:`.labelled`); each takes a path, a split and the
  :class:`.labelled.LabelOptions`.
- :data:`QA_SOURCES`: question-answer pairs for medical VQA: VQA-RAD, SLAKE (:mod:`.questions`).

A new format is its reader in one of those modules and one line here; the config's ``Literal`` of
format names lists the same names (a test holds them equal). The tables are written out rather than
filled by each module on import: what is registered never depends on what happens to be imported.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import DataConfig
from .formats import read_medpix, read_pmc_oa, read_roco, read_table
from .labelled import LabelledImage, LabelOptions, read_chexpert, read_label_csv, read_mimic, read_nih
from .phantom import phantom_split
from .questions import QAItem, read_slake, read_vqa_rad
from .records import DataError, ItemSet, Record, join_item_sets


def _path(cfg: DataConfig) -> str:
    if not cfg.path:
        raise DataError(f"data.path is required for data.format={cfg.format}")
    return cfg.path


PAIR_SOURCES: dict[str, Callable[[DataConfig, str | None], ItemSet[Record]]] = {
    "medpix": lambda cfg, split: read_medpix(_path(cfg), split),
    "pmc-oa": lambda cfg, split: read_pmc_oa(_path(cfg), split, cfg.image_root),
    "roco": lambda cfg, split: read_roco(_path(cfg), split),
    "csv": lambda cfg, split: read_table(
        _path(cfg), "csv", cfg.image_key, cfg.caption_key, cfg.image_root, split, cfg.split_key
    ),
    "jsonl": lambda cfg, split: read_table(
        _path(cfg), "jsonl", cfg.image_key, cfg.caption_key, cfg.image_root, split, cfg.split_key
    ),
    "phantom": lambda cfg, split: phantom_split(cfg.phantom_size, split),
}
LABELLED_SOURCES: dict[str, Callable[[str, str, LabelOptions], ItemSet[LabelledImage]]] = {
    "nih": lambda path, split, o: read_nih(path, split, o.val_fraction, o.split_seed),
    "chexpert": lambda path, split, o: read_chexpert(
        path, split, o.policy, o.frontal_only, o.val_fraction, o.split_seed
    ),
    "mimic": lambda path, split, o: read_mimic(path, split, o.policy, o.frontal_only),
    "csv": lambda path, split, o: read_label_csv(path),  # one file: every row, whatever the split
}
QA_SOURCES: dict[str, Callable[[str, str], ItemSet[QAItem]]] = {
    "vqa-rad": read_vqa_rad,
    "slake": read_slake,
}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise DataError(f"unknown {what} format {name!r}; one of {', '.join(table)}")
    return table[name]


def read_records(cfg: DataConfig, split: str | None = None) -> ItemSet[Record]:
    """The records of ``cfg.format`` at ``cfg.path``; ``split`` overrides ``cfg.split``. Splits joined
    with ``+`` (``dev+test``) are read one after the other into one set, in that order."""
    split = cfg.split if split is None else split
    if split and "+" in split:
        return join_item_sets([read_records(cfg, part.strip()) for part in split.split("+")])
    return _lookup(PAIR_SOURCES, cfg.format, "data")(cfg, split)


def read_labelled(fmt: str, path: str, split: str, options: LabelOptions | None = None) -> ItemSet[LabelledImage]:
    """The labelled images of ``split`` of the ``fmt`` release at ``path`` (``options``: the defaults)."""
    return _lookup(LABELLED_SOURCES, fmt, "labelled-image")(path, split, options or LabelOptions())


def read_qa(fmt: str, path: str, split: str) -> ItemSet[QAItem]:
    """The questions of ``split`` of the ``fmt`` release at ``path``."""
    return _lookup(QA_SOURCES, fmt, "VQA")(path, split)
