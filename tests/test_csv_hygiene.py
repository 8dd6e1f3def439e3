"""Messy tables: a byte-order mark is fine; a bad byte, a path leaving the image folder or a
repeated row skips that row, counted with where it was; nothing usable names a path it looked for."""

import json

import numpy as np
import pytest
from PIL import Image

from unimlip_fast.config import DataConfig
from unimlip_fast.data.records import DataError
from unimlip_fast.data.sources import read_records


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"img{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "secret.png")  # outside the image folder
    return root


def read_csv(path, images):
    return read_records(DataConfig(format="csv", path=str(path), image_root=str(images)), "train")


def test_bom_bad_bytes_outside_root_and_duplicates(tmp_path, images):
    table = tmp_path / "pairs.csv"
    table.write_bytes(
        b"\xef\xbb\xbfimage,caption\n"  # line 1: the header behind a UTF-8 byte-order mark
        b"img0.png,a chest scan\n"  # line 2
        b"img1.png,a caf\xe9 scan\n"  # line 3: Latin-1, not UTF-8
        b"../secret.png,leaves the folder\n"  # line 4
        + f"{tmp_path / 'secret.png'},absolute elsewhere\n".encode()  # line 5
        + b"img0.png,a chest scan\n"  # line 6: line 2 again
        b"img2.png,a head scan\n"  # line 7
        b"img9.png,no such image\n"
    )  # line 8
    rs = read_csv(table, images)
    assert [r.caption for r in rs] == ["a chest scan", "a head scan"]
    assert dict(rs.skipped) == {"bad_encoding": 1, "outside_root": 2, "duplicate_row": 1, "missing_image": 1}
    assert rs.skipped.first["bad_encoding"] == "pairs.csv line 3"
    assert rs.skipped.first["duplicate_row"] == "pairs.csv line 6"
    assert rs.skipped.first["outside_root"].startswith("pairs.csv line 4")
    assert "bad_encoding=1 (first: pairs.csv line 3)" in rs.summary()


def test_jsonl_bad_bytes_and_bom(tmp_path, images):
    table = tmp_path / "pairs.jsonl"
    table.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"image": "img0.png", "caption": "one"}).encode()
        + b"\n"
        + b'{"image": "img1.png", "caption": "caf\xe9"}\n'
        + json.dumps({"image": "img2.png", "caption": "three"}).encode()
        + b"\n"
    )
    rs = read_records(DataConfig(format="jsonl", path=str(table), image_root=str(images)), "train")
    assert [r.caption for r in rs] == ["one", "three"]
    assert dict(rs.skipped) == {"bad_encoding": 1} and rs.skipped.first["bad_encoding"] == "pairs.jsonl line 2"


def test_every_image_missing_names_a_path_and_the_key(tmp_path, images):
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\nimg0.png,one\nimg1.png,two\n")
    with pytest.raises(DataError, match=rf"missing_image=2 \(first: {tmp_path / 'img0.png'}\).*data\.image_root"):
        read_records(DataConfig(format="csv", path=str(table)), "train")  # relative to the table's folder
    assert len(read_csv(table, images)) == 2
