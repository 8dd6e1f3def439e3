"""Record readers: every format on tiny files, skip counts per reason, the real MedPix, phantom."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from unimlip_fast.config import DataConfig
from unimlip_fast.data.formats import roco_eval_subset
from unimlip_fast.data.phantom import phantom_records, phantom_sample, phantom_split
from unimlip_fast.data.reading import ImageIndex
from unimlip_fast.data.records import DataError
from unimlip_fast.data.sources import read_records

from .helpers import medpix_path


def _img(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def _medpix_row(image, caption):
    return {"Type": "CT", "U_id": image.split("_")[0], "image": image, "Description": {"Caption": caption}}


def test_image_index_matches_any_extension(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.png")
    _img(tmp_path / "b.jpeg")  # two files, one stem: the first name in order wins, every time
    _img(tmp_path / "sub" / "c.tif")
    index = ImageIndex(tmp_path)
    assert index.find("a.png").endswith("a.jpg")
    assert index.find("a").endswith("a.jpg")
    assert index.find("b").endswith("b.jpeg")
    assert index.find("b.png").endswith("b.png")  # an exact name beats the stem
    assert index.find("sub/c.jpg").endswith("sub/c.tif")
    assert index.find("zzz.jpg") is None and index.find("") is None


def test_medpix_layout_skips_counted(tmp_path):
    root = tmp_path / "medpix2"
    for name in ("MPX1_synpic1", "MPX1_synpic2", "MPX2_synpic3", "MPX3_synpic5"):
        _img(root / "images" / f"{name}.jpg")  # the release names PNGs; the copy holds JPEGs
    rows = [
        _medpix_row("MPX1_synpic1", "CT of the  chest shows a mass."),
        _medpix_row("MPX1_synpic2", "CT of the chest shows a mass."),
        _medpix_row("MPX2_synpic3", "   "),
        _medpix_row("MPX2_synpic4", "No image for this one."),
        _medpix_row("MPX3_synpic5", None),
        '{"image": "MPX9_synpic9", "Description": {"Caption": NaN}}',  # json NaN literal
        "{not json",
        {"image": "MPX1_synpic1"},  # no Description
    ]
    _jsonl(root / "splitted_dataset" / "descriptions_train.jsonl", rows)
    (root / "Descriptions.json").write_text(json.dumps([_medpix_row("MPX1_synpic1", "Head MRI.")]))

    rs = read_records(DataConfig(format="medpix", path=str(root)), "train")
    assert [r.key for r in rs.items] == ["MPX1_synpic1", "MPX1_synpic2"]
    assert rs.items[0].caption == "CT of the chest shows a mass."  # whitespace collapsed
    assert rs.items[0].image.endswith("images/MPX1_synpic1.jpg")
    assert dict(rs.skipped) == {"empty_caption": 1, "missing_image": 1, "nan_caption": 2, "bad_row": 2}
    assert "missing_image=1" in rs.summary()

    everything = read_records(DataConfig(format="medpix", path=str(root), split="all"))
    assert [r.caption for r in everything.items] == ["Head MRI."]
    with pytest.raises(DataError, match="split 'test'"):
        read_records(DataConfig(format="medpix", path=str(root)), "test")


def test_empty_result_is_an_error_naming_path_and_counts(tmp_path):
    root = tmp_path / "medpix2"
    (root / "images").mkdir(parents=True)
    _jsonl(root / "splitted_dataset" / "descriptions_dev.jsonl", [_medpix_row("MPX1_synpic1", "a caption")])
    with pytest.raises(DataError, match=r"descriptions_dev\.jsonl.*missing_image=1"):
        read_records(DataConfig(format="medpix", path=str(root)), "val")  # "val" is dev


def test_pmc_oa_folder_file_and_image_root(tmp_path):
    root = tmp_path / "pmc"
    _img(root / "images" / "PMC1_fig1.jpg")
    _img(root / "images" / "PMC2_fig3.png")
    rows = [
        {"image": "PMC1_fig1.jpg", "caption": "Chest radiograph.", "alignment_type": "x"},
        {"image": "PMC2_fig3.jpg", "caption": "Axial CT of the abdomen."},  # stored as .png
        {"image": "PMC3_fig1.jpg", "caption": "Gone."},
        {"caption": "no image field"},
    ]
    _jsonl(root / "train.jsonl", rows)
    _jsonl(root / "valid.jsonl", rows[:1])
    rs = read_records(DataConfig(format="pmc-oa", path=str(root)), "train")
    assert [r.key for r in rs.items] == ["PMC1_fig1.jpg", "PMC2_fig3.jpg"]
    assert rs.items[1].image.endswith("PMC2_fig3.png")
    assert dict(rs.skipped) == {"missing_image": 1, "bad_row": 1}
    assert len(read_records(DataConfig(format="pmc-oa", path=str(root)), "dev")) == 1

    # A jsonl file given directly, images in a separate image_root.
    _jsonl(tmp_path / "elsewhere" / "pmc_oa.jsonl", rows[:2])
    cfg = DataConfig(
        format="pmc-oa", path=str(tmp_path / "elsewhere" / "pmc_oa.jsonl"), image_root=str(root / "images")
    )
    assert len(read_records(cfg)) == 2


def test_roco_layout_and_split_aliases(tmp_path):
    folder = tmp_path / "roco" / "data" / "validation" / "radiology"
    _img(folder / "images" / "ROCO_00020.jpg")
    _img(folder / "images" / "ROCO_00021.png")
    (folder / "captions.txt").write_text(
        "ROCO_00020\t Computed tomography of the chest.\n"
        "ROCO_00021\t  Lateral radiograph of the knee. \n"
        "ROCO_00022\t Missing image.\n"
        "ROCO_00023\t \n"
        "a line without a tab\n"
    )
    for split in ("validation", "val", "dev"):
        rs = read_records(DataConfig(format="roco", path=str(tmp_path / "roco")), split)
        assert [(r.key, r.caption) for r in rs.items] == [
            ("ROCO_00020", "Computed tomography of the chest."),
            ("ROCO_00021", "Lateral radiograph of the knee."),
        ]
        assert dict(rs.skipped) == {"missing_image": 1, "empty_caption": 1, "bad_row": 1}
    # The data/ folder itself is accepted as the root too.
    assert len(read_records(DataConfig(format="roco", path=str(tmp_path / "roco" / "data")), "val")) == 2


def test_csv_columns_root_and_bad_rows(tmp_path):
    _img(tmp_path / "imgs" / "scans" / "a.png")
    _img(tmp_path / "imgs" / "scans" / "b.jpg")
    _img(tmp_path / "imgs" / "scans" / "c.jpg")
    (tmp_path / "pairs.csv").write_text(
        "file,text,extra\n"
        'scans/a.jpg,"MRI, T2 weighted",1\n'
        "scans/b.jpg,nan,2\n"
        "scans/c.jpg,,3\n"
        "scans/d.jpg,missing,4\n"
        "scans/c.jpg,too,many,fields\n"
        "scans/c.jpg\n"
    )
    cfg = DataConfig(
        format="csv",
        path=str(tmp_path / "pairs.csv"),
        image_key="file",
        caption_key="text",
        image_root=str(tmp_path / "imgs"),
    )
    rs = read_records(cfg)
    assert [(r.key, r.caption) for r in rs.items] == [("scans/a.jpg", "MRI, T2 weighted")]
    assert rs.items[0].image.endswith("scans/a.png")
    assert dict(rs.skipped) == {"nan_caption": 1, "empty_caption": 1, "missing_image": 1, "bad_row": 2}

    with pytest.raises(DataError, match="no column 'caption'"):
        read_records(DataConfig(format="csv", path=str(tmp_path / "pairs.csv"), image_key="file"))


def test_jsonl_generic_relative_to_its_folder(tmp_path):
    _img(tmp_path / "set" / "x1.png")
    _jsonl(
        tmp_path / "set" / "test.jsonl",
        [
            {"path": "x1.jpg", "report": "Normal chest."},
            {"path": "x2.jpg", "report": "Gone."},
            '{"path": "x1.jpg", "report": NaN}',
            {"path": None, "report": "No path."},
        ],
    )
    cfg = DataConfig(format="jsonl", path=str(tmp_path / "set"), image_key="path", caption_key="report")
    rs = read_records(cfg, "test")  # a folder: {split}.jsonl inside
    assert [r.caption for r in rs.items] == ["Normal chest."]
    assert dict(rs.skipped) == {"missing_image": 1, "nan_caption": 1, "bad_row": 1}


def test_roco_eval_subset_is_the_published_protocol(tmp_path):
    """M3AE's prepro_irtr_roco, written out: random.seed(42) once, the raw lines of train, validation
    and test shuffled in that order, then the first n test lines of two fields and >= 3 words."""
    root = tmp_path / "roco" / "data"
    lines = {
        "train": [f"ROCO_1{i:04d}\t train caption number {i}" for i in range(37)],
        "validation": [f"ROCO_2{i:04d}\t val caption {i}" for i in range(11)],
        "test": [f"ROCO_3{i:04d}\t {' '.join(['word'] * (1 + i % 5))} {i % 4}" for i in range(60)]
        + ["a line without a tab", "ROCO_39998\t the same caption", "ROCO_39999\t the same caption"],
    }
    for split, rows in lines.items():
        folder = root / split / "radiology"
        folder.mkdir(parents=True)
        (folder / "captions.txt").write_text("\n".join(rows) + "\n")
    state = random.getstate()
    random.seed(42)
    for split in ("train", "validation", "test"):
        shuffled = (root / split / "radiology" / "captions.txt").read_text().strip().split("\n")
        random.shuffle(shuffled)
    expected = []
    for line in shuffled:
        fields = line.strip().split("\t")
        if len(fields) == 2 and len(fields[1].split()) >= 3:
            expected.append(fields[0])
            if len(expected) == 20:
                break
    random.setstate(state)
    missing = expected[3]  # one chosen pair's image is missing: skipped and counted, not replaced
    for row in lines["test"]:
        key = row.split("\t")[0]
        if "\t" in row and key != missing:
            _img(root / "test" / "radiology" / "images" / f"{key}.jpg")

    got = roco_eval_subset(tmp_path / "roco", n=20)
    assert [r.key for r in got.items] == [k for k in expected if k != missing]
    assert dict(got.skipped) == {"missing_image": 1}
    assert all(len(r.caption.split()) >= 3 for r in got.items)
    whole = roco_eval_subset(tmp_path / "roco", n=2000)  # fewer than n: all that qualify, duplicates kept
    assert {"ROCO_39998", "ROCO_39999"} <= {r.key for r in whole.items}
    # Shuffling test alone (without train and validation first) chooses differently.
    alone = list(lines["test"])
    random.Random(42).shuffle(alone)
    assert [r.split("\t")[0] for r in alone if len(r.split("\t")) == 2][:20] != expected


def test_real_medpix_counts():
    root = medpix_path()
    for split, n in (("train", 1636), ("dev", 196), ("test", 199)):
        rs = read_records(DataConfig(format="medpix", path=str(root)), split)
        assert len(rs) == n and sum(rs.skipped.values()) == 0, rs.summary()
    assert all(r.image.endswith(".jpg") for r in rs.items)


# ------------------------------------------------------------------------------------------- phantom


def test_phantom_is_deterministic_and_independent_of_n():
    a = phantom_records(6, seed=3)
    b = phantom_records(4, seed=3)
    for ra, rb in zip(a.items, b.items):
        assert ra.key == rb.key and ra.caption == rb.caption
        np.testing.assert_array_equal(ra.image, rb.image)
    c = phantom_records(4, seed=4)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(b.items, c.items))


def test_phantom_images_and_captions_carry_the_factors():
    for i in range(12):
        image, caption, f = phantom_sample(0, i, px=64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image[..., 0], image[..., 2])  # greyscale
        for value in (f["modality"], f["region"], f["size"], *f["position"].split()):
            assert value.lower() in caption.lower()
        assert f["count"] in caption.lower()
    rs = phantom_records(200, 0)
    assert len({r.caption for r in rs.items}) > 100


def test_phantom_lesions_in_named_quadrant():
    # Large CT lesions are bright rings: the quadrant with the most bright pixels is the named one.
    hits = total = 0
    for i in range(200):
        image, caption, f = phantom_sample(7, i, px=64)
        if f["modality"] != "CT" or f["size"] != "large" or f["region"] != "abdomen":
            continue
        grey = image[..., 0].astype(float)
        quads = {
            ("upper", "left"): grey[:32, :32],
            ("upper", "right"): grey[:32, 32:],
            ("lower", "left"): grey[32:, :32],
            ("lower", "right"): grey[32:, 32:],
        }
        brightest = max(quads, key=lambda k: (quads[k] > 200).sum())
        hits += " ".join(brightest) == f["position"]
        total += 1
    assert total >= 3 and hits == total


def test_phantom_splits(monkeypatch):
    cfg = DataConfig(format="phantom", phantom_size=6)
    train = read_records(cfg)
    test = read_records(cfg, "test")
    assert len(train) == 6 and len(test) == 6
    assert not np.array_equal(train.items[0].image, test.items[0].image)
    monkeypatch.setattr("unimlip_fast.data.phantom.EVAL_SIZE", 8)  # dev/test: at most EVAL_SIZE pairs
    assert len(phantom_split(40, "val")) == 8 and len(phantom_split(40, "train")) == 40
    with pytest.raises(ValueError):
        phantom_split(10, "holdout")


def test_one_split_vocabulary_and_a_reader_for_every_format():
    from unimlip_fast.config import CLASSIFY_FORMATS, DATA_FORMATS, VQA_FORMATS
    from unimlip_fast.data.records import canonical_split
    from unimlip_fast.data.sources import LABELLED_SOURCES, PAIR_SOURCES, QA_SOURCES

    assert canonical_split("Validation") == canonical_split("valid") == canonical_split("val") == "dev"
    assert canonical_split("all") is None and canonical_split(None) is None and canonical_split("training") == "train"
    with pytest.raises(DataError, match="unknown split 'holdout'.*dev: dev, val, valid"):
        canonical_split("holdout")
    assert set(PAIR_SOURCES) == set(DATA_FORMATS)
    assert set(LABELLED_SOURCES) == {*CLASSIFY_FORMATS, "csv"} and set(QA_SOURCES) == set(VQA_FORMATS)
    with pytest.raises(DataError, match="unknown data format 'dicom'"):
        read_records(DataConfig(format="dicom", path="/x"))
