"""Downstream readers on the real files and on small release-shaped files; label fractions; answers; AUC."""

import math

import numpy as np
import pytest

from unimlip_fast.data.labelled import (
    CHEXPERT_LABELS,
    NIH_LABELS,
    LabelledImage,
    chexpert_value,
    draw_fraction,
    label_rates,
    nih_target,
    read_chexpert,
    read_mimic,
    read_nih,
)
from unimlip_fast.data.questions import normalize_answer, read_slake, read_vqa_rad
from unimlip_fast.data.records import DataError
from unimlip_fast.eval.metrics import average_ranks, macro_auc, roc_auc, vqa_accuracy

from .helpers import SHARED_DATA, write_chexpert, write_mimic, write_slake


def shared(name: str):
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (../shared/data beside the repo, or $UNIMLIP_SHARED_DATA)")
    return path


# --------------------------------------------------------------------------------------- real data


def test_nih1000_folder_split_with_labels_from_the_csv():
    root = shared("nih1000")
    sizes = {}
    for split in ("train", "valid", "test"):
        data = read_nih(root, split)
        sizes[split] = len(data)
        assert data.labels == NIH_LABELS and not data.skipped
        normal = [it for it in data.items if "0_normal" in it.path]
        assert len(normal) == len(data) // 2
    assert sizes == {"train": 600, "valid": 200, "test": 200}
    train = {it.path.rsplit("/", 1)[-1]: it for it in read_nih(root, "train").items}
    # the CSV's second row: 00000001_001.png,Cardiomegaly|Emphysema,...,Patient ID 1 (11 fields, commas in
    # the bracketed header names): when present in the train split its targets must be exactly these two
    if "00000001_001.png" in train:
        item = train["00000001_001.png"]
        assert {NIH_LABELS[j] for j, v in enumerate(item.target) if v == 1} == {"Cardiomegaly", "Emphysema"}
        assert item.patient == "1"
    positives = sum(sum(it.target) > 0 for it in train.values())
    assert 250 <= positives <= 300  # the abnormal folder, less rows whose only findings are not among the 14


def test_nih_official_lists(tmp_path):
    """Data_Entry_2017.csv (the first release: a trailing empty column) with train_val_list/test_list."""
    from .helpers import write_image

    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
    )
    rows, train_val, test = [], [], []
    for p in range(10):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            findings = "Mass|Effusion" if (p + k) % 3 == 0 else "No Finding"
            rows.append(f"{name},{findings},{k},{p},50,M,PA,2500,2048,0.14,0.14,\n")
            (test if p >= 8 else train_val).append(name)
            write_image(tmp_path / "images_001" / "images" / name, p * 2 + k)
    rows.append("00000099_000.png,Pneumonia,0,99,50,M,PA\n")  # too few fields
    rows.append("00000098_000.png,Dragons,0,98,50,M,PA,1,1,1,1,\n")
    write_image(tmp_path / "images_001" / "images" / "00000098_000.png", 1)
    train_val += ["00000098_000.png", "00000097_000.png"]  # unknown label; not in the CSV
    (tmp_path / "Data_Entry_2017.csv").write_text(header + "".join(rows))
    (tmp_path / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(test) + "\n")
    train, valid, test_set = (read_nih(tmp_path, s, val_fraction=0.25) for s in ("train", "valid", "test"))
    assert len(test_set) == 4 and len(train) + len(valid) == 16
    valid_patients = {it.patient for it in valid}
    assert {it.patient for it in train}.isdisjoint(valid_patients) and len(valid_patients) == 2
    assert train.skipped == {"malformed_row": 1, "unknown_label_value": 1, "not_in_label_file": 1}
    mass = [it for it in test_set.items if it.target[NIH_LABELS.index("Mass")] == 1]
    assert all(it.target[NIH_LABELS.index("Effusion")] == 1 for it in mass) and mass


def test_vqa_rad_answers_normalised():
    root = shared("vqa_rad")
    train, test = read_vqa_rad(root, "train"), read_vqa_rad(root, "test")
    assert (len(train), len(test)) == (3064, 451) and not train.skipped and not test.skipped
    assert {it.answer_type for it in train.items} == {"OPEN", "CLOSED"}  # "CLOSED " read as CLOSED
    answers = {it.answer for it in train.items}
    assert "yes" in answers and "Yes" not in answers
    assert all(a == normalize_answer(a) for a in answers)
    with pytest.raises(DataError, match="no validation split"):
        read_vqa_rad(root, "valid")


# ------------------------------------------------------------------------------ release-shaped files


def test_chexpert_reader_and_uncertainty_policies(tmp_path):
    release = write_chexpert(tmp_path)
    edema = CHEXPERT_LABELS.index("Edema")
    for policy, expected in (("u-ones", 1.0), ("u-zeros", 0.0)):
        items = read_chexpert(release, "train", policy).items + read_chexpert(release, "valid", policy).items
        uncertain = [it for it in items if it.patient in {f"patient{p:05d}" for p in range(0, 12, 3)}]
        assert uncertain and all(it.target[edema] == expected for it in uncertain)
    ignore = read_chexpert(release, "train", "u-ignore")
    assert any(math.isnan(it.target[edema]) for it in ignore.items)
    assert ignore.skipped == {"not_frontal": 12, "missing_image": 1, "unknown_label_value": 1}
    assert all("frontal" in it.path for it in ignore.items)
    train, valid = read_chexpert(release, "train"), read_chexpert(release, "valid")
    assert len(train) + len(valid) == 24
    assert {it.patient for it in train.items}.isdisjoint(it.patient for it in valid.items)
    assert len(read_chexpert(release, "test")) == 8  # the official valid.csv: 4 patients x 2 frontal studies
    assert len(read_chexpert(release, "train", frontal_only=False)) > len(train)
    assert chexpert_value("", "u-ones") == 0.0 and chexpert_value("-1", "u-ones") == 1.0
    assert chexpert_value("2.0", "u-ones") is None and chexpert_value("x", "u-zeros") is None


def test_mimic_reader_frontal_views_and_bad_rows(tmp_path):
    root = write_mimic(tmp_path)
    train = read_mimic(root, "train", "u-zeros")
    # subjects 0-3: PA and AP frontal (d0ap missing on disk), laterals skipped; an image with no label row
    assert len(train) == 7
    assert train.skipped == {"not_frontal": 4, "missing_image": 1, "no_label_row": 1}
    assert all(it.target[CHEXPERT_LABELS.index("Edema")] == 0.0 for it in train.items)
    assert len(read_mimic(root, "valid")) == 2 and len(read_mimic(root, "test", "u-ones")) == 2
    assert all(it.target[CHEXPERT_LABELS.index("Edema")] == 1.0 for it in read_mimic(root, "test", "u-ones").items)


def test_slake_english_only_and_skips(tmp_path):
    root = write_slake(tmp_path)
    train = read_slake(root, "train")
    assert len(train) == 16  # 8 images x (one English closed + one open)
    assert train.skipped == {"not_english": 8, "missing_image": 1, "empty_question": 1}
    assert {it.answer for it in train.items} == {"yes", "no", "left", "right"}
    assert len(read_slake(root, "valid")) == 4
    with pytest.raises(DataError, match="no usable train questions"):
        (root / "train.json").write_text("[]")
        read_slake(root, "train")


def test_normalize_answer():
    assert normalize_answer(" Yes ") == "yes"
    assert normalize_answer("Left  Lung\n") == "left lung"
    assert normalize_answer(3) == "3"


# ------------------------------------------------------------------------------------ label fractions


def _items(n_patients=40, per_patient=(1, 2, 3)):
    items = []
    for p in range(n_patients):
        for k in range(per_patient[p % len(per_patient)]):
            items.append(LabelledImage(f"{p}_{k}.png", (float((p + k) % 2), float(p % 5 == 0)), str(p)))
    return items


def test_label_fraction_is_reproducible_and_by_patient():
    items = _items()
    a, b = draw_fraction(items, 0.1, seed=3), draw_fraction(items, 0.1, seed=3)
    assert a == b
    assert draw_fraction(items, 0.1, seed=4) != a
    assert abs(len(a) - 0.1 * len(items)) <= 3  # whole patients, stopped once the target is reached
    chosen = {it.patient for it in a}
    assert all(it.patient not in chosen or it in a for it in items)  # every image of a chosen patient
    assert draw_fraction(items, 1.0, 0) == items
    with pytest.raises(DataError):
        draw_fraction(items, 0.0, 0)
    rates = label_rates(a, ("x", "y"))
    assert rates["x"]["positives"] == sum(it.target[0] for it in a)
    assert rates["x"]["rate"] == round(rates["x"]["positives"] / len(a), 4)


def test_nih_target():
    assert nih_target("Mass|Effusion")[NIH_LABELS.index("Mass")] == 1.0
    assert sum(nih_target("No Finding")) == 0
    assert nih_target("Mass|Dragons") == "unknown_label_value"
    assert nih_target("") == "empty_label"


# -------------------------------------------------------------------------------------------- metrics


def test_roc_auc_matches_scikit_learn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (the dev extra) is the reference")
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 60))
        targets = rng.integers(0, 2, n)
        targets[:2] = [0, 1]
        scores = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(size=n)  # ties on odd trials
        assert roc_auc(scores, targets) == pytest.approx(sklearn_metrics.roc_auc_score(targets, scores), abs=1e-12)
    scores = np.array([[0.1, 0.9, 0.5], [0.4, 0.8, 0.5], [0.35, 0.2, 0.1], [0.8, 0.3, 0.7]])
    targets = np.array([[0, 1, 0], [0, 1, np.nan], [1, 1, 1], [1, 1, 0]])
    out = macro_auc(scores, targets, ("a", "b", "c"))
    assert out["excluded"] == ["b"]  # one class only
    assert out["per_label"]["a"] == pytest.approx(sklearn_metrics.roc_auc_score([0, 0, 1, 1], scores[:, 0]))
    assert out["per_label"]["c"] == pytest.approx(sklearn_metrics.roc_auc_score([0, 1, 0], scores[[0, 2, 3], 2]))
    assert out["macro_auc"] == pytest.approx((out["per_label"]["a"] + out["per_label"]["c"]) / 2)


def test_average_ranks_and_degenerate_auc():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1, 1])


def test_vqa_accuracy_by_type():
    out = vqa_accuracy(["yes", "left", "no"], ["yes", "right", "no"], ["CLOSED", "OPEN", "CLOSED"])
    assert out == {"open": 0.0, "closed": 1.0, "overall": pytest.approx(2 / 3)}
