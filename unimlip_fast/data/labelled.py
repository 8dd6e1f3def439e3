"""Labelled images: chest X-ray classification (fine-tuned, zero-shot) and a generic label CSV.

Chest X-ray classification (multi-label, one target per label: 1, 0, or NaN where a label is to
be ignored):
- NIH ChestX-ray14: ``Data_Entry_2017*.csv`` with the official ``train_val_list.txt`` /
  ``test_list.txt`` (validation: ``val_fraction`` of the train_val patients), or a folder split
  ``<root>/{train,valid,test}/<any class folder>/<Image Index>.png`` (../shared/data/nih1000) whose
  labels come from the CSV. The CSV's bracketed header names contain commas
  (``OriginalImage[Width,Height]``), so it is read with the csv module and columns are found by name.
- CheXpert: ``train.csv`` / ``valid.csv`` (``test.csv`` where present is the test split, else the
  official ``valid.csv`` is, as is usual; validation is then ``val_fraction`` of the train patients).
  1.0 positive, 0.0 negative, blank not mentioned (negative), -1.0 uncertain, mapped by the
  uncertainty policy: ``u-ones`` (positive), ``u-zeros`` (negative), ``u-ignore`` (left out of the
  loss and of that label's AUC).
- MIMIC-CXR-JPG: ``mimic-cxr-2.0.0-chexpert.csv`` (labels per study, same values as CheXpert), the
  split CSV (``train``/``validate``/``test`` per image) and the metadata CSV (``ViewPosition``: PA or
  AP are frontal); images at ``files/p<XX>/p<subject>/s<study>/<dicom>.jpg``; ``.csv.gz`` is read too.

A label CSV (zero-shot, ``csv:PATH``): an image column (paths relative to the CSV's folder) and
one column per label: 1 positive, 0 negative, blank or -1 unknown (left out of that label's AUC).

Every reader returns an :class:`.records.ItemSet` of :class:`LabelledImage` s with the label names
in ``labels``, and the rows it skipped per reason, the first place of each kept (:mod:`.records`).
"""

from __future__ import annotations

import collections
import csv
import gzip
import math
import os
import random
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config import UncertaintyPolicy
from .reading import ImageIndex
from .records import DataError, ItemSet, Skips, describe_skips, finish, one_split

NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
UNCERTAINTY_POLICIES: tuple[str, ...] = typing.get_args(UncertaintyPolicy)


@dataclass(frozen=True)
class LabelOptions:
    """How a chest X-ray release is read; each reader takes the options that apply to it."""

    policy: UncertaintyPolicy = "u-ones"  # CheXpert/MIMIC -1.0
    frontal_only: bool = True  # CheXpert/MIMIC: frontal views only
    val_fraction: float = 0.1  # patients held out of the training pool where the release has no validation split
    split_seed: int = 0  # that hold-out's draw


# --------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class LabelledImage:
    path: str
    target: tuple[float, ...]  # 1.0 / 0.0 per label; NaN: ignored (U-Ignore)
    patient: str


def _labelled(items: list[LabelledImage], labels, skipped: Skips, source, split: str) -> ItemSet[LabelledImage]:
    return finish(items, skipped, source, f"{split} images", labels=tuple(labels))


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", newline="", encoding="utf-8")
        if path.suffix == ".gz"
        else open(path, newline="", encoding="utf-8")
    )


def read_csv_rows(path: Path, skipped: Skips, required: tuple[str, ...]):
    """Rows of a CSV as ``{column: value}`` by the header's names; rows with fewer fields than the
    header are counted ``malformed_row`` (the NIH file's trailing empty column is tolerated)."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: columns {missing} not in the header {header}")
        width = len([h for h in header if h])
        for fields in reader:
            if not any(v.strip() for v in fields):
                continue
            if len(fields) < width:
                skipped.note("malformed_row", f"{path.name} line {reader.line_num}")
                continue
            yield dict(zip(header, fields[: len(header)], strict=False))


def held_out_patients(patients, fraction: float, seed: int) -> set[str]:
    """A reproducible ``fraction`` of the distinct patients (at least one when fraction > 0)."""
    distinct = sorted(set(patients))
    random.Random(seed).shuffle(distinct)
    n = min(len(distinct), max(1, round(fraction * len(distinct)))) if fraction > 0 else 0
    return set(distinct[:n])


def _by_patient_split(items: list[LabelledImage], split: str, val_fraction: float, seed: int) -> list[LabelledImage]:
    """train/dev carved from one pool: ``val_fraction`` of its patients are the validation split."""
    val = held_out_patients((it.patient for it in items), val_fraction, seed)
    return [it for it in items if (it.patient in val) == (split == "dev")]


# --- NIH


def _nih_csv(root: Path) -> Path:
    found = sorted(root.glob("Data_Entry_2017*.csv")) + sorted(root.glob("*/Data_Entry_2017*.csv"))
    if not found:
        raise DataError(f"no Data_Entry_2017*.csv in {root}")
    return found[-1]  # the latest release (Data_Entry_2017_v2020.csv sorts after Data_Entry_2017.csv)


def nih_target(findings: str) -> tuple[float, ...] | str:
    """``"Effusion|Mass"`` -> one 0/1 per NIH label; an unknown name -> the skip reason."""
    names = [n.strip() for n in findings.split("|") if n.strip()]
    if not names:
        return "empty_label"
    if any(n not in NIH_LABELS and n != "No Finding" for n in names):
        return "unknown_label_value"
    return tuple(1.0 if label in names else 0.0 for label in NIH_LABELS)


def _nih_folder_split(root: Path) -> Path | None:
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (base / "train").is_dir() and (base / "test").is_dir():
            return base
    return None


def read_nih(
    path: str | os.PathLike, split: str, val_fraction: float = 0.1, split_seed: int = 0
) -> ItemSet[LabelledImage]:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"NIH ChestX-ray14 folder not found: {root}")
    split = one_split(split, "NIH ChestX-ray14")
    csv_path = _nih_csv(root)
    skipped = Skips()
    rows = {
        r["Image Index"].strip(): r
        for r in read_csv_rows(csv_path, skipped, ("Image Index", "Finding Labels", "Patient ID"))
    }
    folders = _nih_folder_split(root)
    if folders is not None:
        split_dir = folders / {"dev": "valid", "train": "train", "test": "test"}[split]
        if split == "dev" and not split_dir.is_dir():
            split_dir = folders / "val"
        paths = {p.name: str(p) for p in sorted(split_dir.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
        wanted = list(paths)
    else:
        list_file = root / ("test_list.txt" if split == "test" else "train_val_list.txt")
        if not list_file.is_file():
            raise DataError(f"{list_file} not found (NIH's official split lists, or a train/valid/test folder split)")
        wanted = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        index = {}
        for folder in [root, *sorted(root.glob("images*")), *sorted(root.glob("images*/images"))]:
            if folder.is_dir():
                index.update({e.name: e.path for e in os.scandir(folder) if e.is_file()})
        paths = index
    items = []
    for name in wanted:
        row = rows.get(name)
        if row is None:
            skipped.note("not_in_label_file", name)
            continue
        if name not in paths:
            skipped.note("missing_image", name)
            continue
        target = nih_target(row["Finding Labels"])
        if isinstance(target, str):
            skipped.note(target, f"{name}: {row['Finding Labels']!r}")
            continue
        items.append(LabelledImage(paths[name], target, row["Patient ID"].strip()))
    if folders is None and split != "test":
        items = _by_patient_split(items, split, val_fraction, split_seed)
    return _labelled(items, NIH_LABELS, skipped, root, split)


# --- CheXpert and MIMIC-CXR (the same 14 labels and values)


def chexpert_value(raw: str, policy: str) -> float | None:
    """One CheXpert label cell -> 1.0 / 0.0 / NaN (ignored); None for a value that is not a label."""
    raw = raw.strip()
    if raw == "":
        return 0.0  # not mentioned
    try:
        value = float(raw)
    except ValueError:
        return None
    if value == 1.0:
        return 1.0
    if value == 0.0:
        return 0.0
    if value == -1.0:
        return {"u-ones": 1.0, "u-zeros": 0.0, "u-ignore": math.nan}[policy]
    return None


def _chexpert_target(row: dict, policy: str) -> tuple[float, ...] | None:
    values = [chexpert_value(row.get(label, ""), policy) for label in CHEXPERT_LABELS]
    return None if any(v is None for v in values) else tuple(values)


def _check_policy(policy: str) -> None:
    if policy not in UNCERTAINTY_POLICIES:
        raise DataError(f"uncertainty policy must be one of {UNCERTAINTY_POLICIES}, got {policy!r}")


def read_chexpert(
    path: str | os.PathLike,
    split: str,
    policy: str = "u-ones",
    frontal_only: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> ItemSet[LabelledImage]:
    root = Path(path)
    _check_policy(policy)
    split = one_split(split, "CheXpert")
    if not (root / "train.csv").is_file():
        raise DataError(f"CheXpert train.csv not found in {root}")
    if split == "test":
        csv_path = root / "test.csv" if (root / "test.csv").is_file() else root / "valid.csv"
    else:
        csv_path = root / "train.csv"
    if not csv_path.is_file():
        raise DataError(f"CheXpert {csv_path.name} not found in {root}")
    skipped = Skips()
    # ``Path`` is relative to the folder above the release (CheXpert-v1.0-small/train/...): look there,
    # in the root itself, and in the root with the release's folder name dropped.
    index_above, index_root = ImageIndex(root.parent), ImageIndex(root)
    items = []
    for row in read_csv_rows(csv_path, skipped, ("Path", *CHEXPERT_LABELS)):
        ref = row["Path"].strip()
        if frontal_only and row.get("Frontal/Lateral", "Frontal").strip() != "Frontal":
            skipped.note("not_frontal", ref)
            continue
        target = _chexpert_target(row, policy)
        if target is None:
            skipped.note("unknown_label_value", ref)
            continue
        found = index_above.find(ref) or index_root.find(ref) or index_root.find(ref.split("/", 1)[-1])
        if found is None:
            skipped.note("missing_image", ref)
            continue
        patient = re.search(r"patient\d+", ref)
        items.append(LabelledImage(found, target, patient.group(0) if patient else ref))
    if split != "test":
        items = _by_patient_split(items, split, val_fraction, split_seed)
    return _labelled(items, CHEXPERT_LABELS, skipped, csv_path, split)


def _mimic_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"MIMIC-CXR-JPG {stem}.csv(.gz) not found in {root}")


def read_mimic(
    path: str | os.PathLike, split: str, policy: str = "u-ones", frontal_only: bool = True
) -> ItemSet[LabelledImage]:
    root = Path(path)
    _check_policy(policy)
    split = one_split(split, "MIMIC-CXR-JPG")
    official = {"train": "train", "dev": "validate", "test": "test"}[split]
    skipped = Skips()
    labels: dict[str, tuple[float, ...] | None] = {}
    for row in read_csv_rows(_mimic_file(root, "mimic-cxr-2.0.0-chexpert"), skipped, ("study_id", *CHEXPERT_LABELS)):
        labels[row["study_id"].strip()] = _chexpert_target(row, policy)
    views = {
        row["dicom_id"].strip(): row.get("ViewPosition", "").strip()
        for row in read_csv_rows(_mimic_file(root, "mimic-cxr-2.0.0-metadata"), skipped, ("dicom_id",))
    }
    images = root / "files" if (root / "files").is_dir() else root
    items = []
    for row in read_csv_rows(
        _mimic_file(root, "mimic-cxr-2.0.0-split"), skipped, ("dicom_id", "study_id", "subject_id", "split")
    ):
        if row["split"].strip() != official:
            continue
        dicom, study, subject = row["dicom_id"].strip(), row["study_id"].strip(), row["subject_id"].strip()
        if frontal_only and views.get(dicom) not in ("PA", "AP"):
            skipped.note("not_frontal", dicom)
            continue
        if study not in labels:
            skipped.note("no_label_row", f"study {study}")
            continue
        target = labels[study]
        if target is None:
            skipped.note("unknown_label_value", f"study {study}")
            continue
        image = images / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        if not image.is_file():
            skipped.note("missing_image", str(image))
            continue
        items.append(LabelledImage(str(image), target, subject))
    return _labelled(items, CHEXPERT_LABELS, skipped, root, split)


# --- a label CSV (zero-shot)


def read_label_csv(path: str | os.PathLike, image_key: str = "image") -> ItemSet[LabelledImage]:
    """A CSV with an image column (paths relative to the CSV's folder) and one column per label:
    1 positive, 0 negative, blank or -1 unknown (left out of that label's AUC)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label CSV not found: {path}")
    skipped = Skips()
    index = ImageIndex(path.parent)
    items, labels = [], None
    for row in read_csv_rows(path, skipped, (image_key,)):
        if labels is None:
            labels = tuple(c for c in row if c and c != image_key)
        image = index.find(row[image_key])
        if image is None:
            skipped.note("missing_image", row[image_key])
            continue
        target = tuple(_csv_value(row[label]) for label in labels)
        if any(isinstance(v, str) for v in target):
            skipped.note("unknown_label_value", row[image_key])
            continue
        items.append(LabelledImage(image, target, row[image_key]))
    if not labels:
        raise DataError(f"no usable images in {path} (skipped: {describe_skips(skipped) or 'no rows'})")
    return finish(items, skipped, path, "images", labels=labels)


def _csv_value(raw: str) -> float | str:
    value = raw.strip()
    if value in ("", "-1", "-1.0"):
        return math.nan
    if value in ("1", "1.0", "0", "0.0"):
        return float(value)
    return "bad"


# --- label fractions


def draw_fraction(items: list[LabelledImage], fraction: float, seed: int) -> list[LabelledImage]:
    """A reproducible ``fraction`` of the images, drawn by patient: patients in a seeded order are
    taken whole until the images reach ``round(fraction * n)`` (at least one patient). Order kept."""
    if not 0 < fraction <= 1:
        raise DataError(f"the label fraction must lie in (0, 1], got {fraction}")
    if fraction == 1:
        return list(items)
    patients = sorted({it.patient for it in items})
    random.Random(seed).shuffle(patients)
    per_patient = collections.Counter(it.patient for it in items)
    target, chosen, n = max(1, round(fraction * len(items))), set(), 0
    for patient in patients:
        if n >= target:
            break
        chosen.add(patient)
        n += per_patient[patient]
    return [it for it in items if it.patient in chosen]


def label_rates(items: list[LabelledImage], labels: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per label: positives, and their share of the images where the label is known."""
    rates = {}
    for j, label in enumerate(labels):
        known = [it.target[j] for it in items if not math.isnan(it.target[j])]
        positives = int(sum(known))
        rates[label] = {"positives": positives, "rate": round(positives / len(known), 4) if known else 0.0}
    return rates
