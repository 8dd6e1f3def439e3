"""Evaluation never reads training data: one CSV/JSONL file has no split unless a column names it."""

import json

import numpy as np
import pytest
from PIL import Image

from unimlip_fast.config import DataConfig
from unimlip_fast.data.records import DataError
from unimlip_fast.data.sources import read_records

from .helpers import REPO, TINY_OVERRIDES, run_cli

SPLITS = ["train"] * 6 + ["test"] * 3 + ["val"] * 2 + [""]


@pytest.fixture
def table(tmp_path):
    """12 pairs with a ``part`` column: 6 train, 3 test, 2 val, 1 naming no split; as CSV and JSONL."""
    rows = []
    for i, part in enumerate(SPLITS):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"scan number {i}", "part": part})
    (tmp_path / "pairs.csv").write_text(
        "image,caption,part\n" + "".join(f"{r['image']},{r['caption']},{r['part']}\n" for r in rows)
    )
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_one_file_without_a_split_column_is_training_data_only(table, fmt):
    cfg = DataConfig(format=fmt, path=str(table / f"pairs.{fmt}"))
    assert len(read_records(cfg, "train")) == len(read_records(cfg, "all")) == len(SPLITS)
    for split in ("test", "dev", "val"):
        with pytest.raises(DataError, match=rf"no split.*data\.split_key.*train\.{fmt} and {split}\.{fmt}"):
            read_records(cfg, split)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_split_key_selects_the_rows_of_a_split(table, fmt):
    cfg = DataConfig(format=fmt, path=str(table / f"pairs.{fmt}"), split_key="part")
    test, train, dev = read_records(cfg, "test"), read_records(cfg, "train"), read_records(cfg, "dev")
    assert [r.caption for r in test] == ["scan number 6", "scan number 7", "scan number 8"]
    assert len(train) == 6 and len(dev) == 2  # "val" is dev
    assert test.skipped["no_split"] == 1  # the row naming no split, counted
    assert len(read_records(cfg, "all")) == len(SPLITS) - 1


def test_a_split_key_that_is_not_a_column_is_named(table):
    with pytest.raises(DataError, match="no column 'fold'"):
        read_records(DataConfig(format="csv", path=str(table / "pairs.csv"), split_key="fold"), "test")


def test_a_folder_of_split_files_and_pmc_oa(table):
    (table / "train.csv").write_text("image,caption\nimg0.png,first\nimg1.png,second\n")
    (table / "test.csv").write_text("image,caption\nimg2.png,third\n")
    cfg = DataConfig(format="csv", path=str(table))
    assert [r.caption for r in read_records(cfg, "test")] == ["third"]
    assert len(read_records(cfg, "train")) == 2

    (table / "pmc").mkdir()
    (table / "pmc" / "pmc_oa.jsonl").write_text(json.dumps({"image": "img0.png", "caption": "a scan"}) + "\n")
    pmc = DataConfig(format="pmc-oa", path=str(table / "pmc"), image_root=str(table))
    assert len(read_records(pmc, "train")) == 1
    with pytest.raises(DataError, match="has none of test.jsonl"):
        read_records(pmc, "test")  # the whole release file never stands for the test split
    with pytest.raises(DataError, match="no split"):
        read_records(DataConfig(format="pmc-oa", path=str(table / "pmc" / "pmc_oa.jsonl")), "test")


def test_eval_retrieval_on_one_file_refuses_test(table, tiny_run, monkeypatch, capsys):
    args = ["eval", "retrieval", "--checkpoint", tiny_run, "--data", f"csv:{table / 'pairs.csv'}", "--split", "test"]
    assert run_cli(monkeypatch, *args) != 0
    err = capsys.readouterr().err
    assert "would be the training rows again" in err and "--split-key" in err and "Traceback" not in err
    out = table / "r.json"
    assert run_cli(monkeypatch, *args, "--split-key", "part", "--json", out) == 0
    assert json.loads(out.read_text())["n"] == 3


def test_pretraining_refuses_an_eval_split_of_training_rows_before_training(table, monkeypatch, capsys):
    base = [
        "pretrain",
        REPO / "configs/demo.yaml",
        *TINY_OVERRIDES,
        "data.format=csv",
        "data.num_workers=0",
        f"data.path={table / 'pairs.csv'}",
        "train.batch_size=4",
        "train.max_steps=1",
    ]
    assert run_cli(monkeypatch, *base, "--run-dir", table / "a", "eval.split=test") != 0
    err = capsys.readouterr().err
    assert "would be the training rows again" in err
    assert "a run pretraining on this file evaluates nothing with eval.split=" in err  # what works, named first
    assert not (table / "a" / "checkpoints").exists() or not any((table / "a" / "checkpoints").iterdir())
    assert (
        run_cli(
            monkeypatch, *base, "--run-dir", table / "b", "data.split_key=part", "data.split=test", "eval.split=test"
        )
        != 0
    )
    assert "holds the same 3 pairs as the training split" in capsys.readouterr().err


def test_eval_retrieval_reads_a_csv_with_other_column_names(table, tiny_run, tmp_path, monkeypatch, capsys):
    """A hospital's CSV: images in ``filename`` under another folder, notes in ``clinical_notes``,
    the split in ``part``: given as data.* keys, or taken from the run when the data is the run's own."""
    import shutil

    from unimlip_fast.config import load_config, save_config

    images = tmp_path / "images"
    images.mkdir()
    rows = ["filename,clinical_notes,part"]
    for i, part in enumerate(SPLITS):
        shutil.copy(table / f"img{i}.png", images / f"img{i}.png")
        rows.append(f"img{i}.png,scan number {i},{part}")
    (tmp_path / "notes.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    keys = [
        "--data-key",
        "image_key=filename",
        "--data-key",
        "data.caption_key=clinical_notes",
        "--data-key",
        f"image_root={images}",
        "--data-key",
        "split_key=part",
    ]
    args = [
        "eval",
        "retrieval",
        "--checkpoint",
        tiny_run,
        "--data",
        f"csv:{tmp_path / 'notes.csv'}",
        "--split",
        "test",
        "--json",
        out,
    ]
    assert run_cli(monkeypatch, *args, *keys) == 0
    assert json.loads(out.read_text())["n"] == 3
    assert run_cli(monkeypatch, *args, "--data-key", "image_kee=filename") == 1
    assert "image_key" in capsys.readouterr().err  # an unknown key names the valid ones

    run = tmp_path / "run"  # the run was trained on this CSV with these keys: they are the defaults
    shutil.copytree(tiny_run, run)
    cfg = load_config(run / "config.yaml")
    cfg.data.format, cfg.data.path, cfg.data.image_root = "csv", str(tmp_path / "notes.csv"), str(images)
    cfg.data.image_key, cfg.data.caption_key, cfg.data.split_key = "filename", "clinical_notes", "part"
    save_config(cfg, run / "config.yaml")
    out.unlink()
    assert (
        run_cli(
            monkeypatch,
            "eval",
            "retrieval",
            "--checkpoint",
            run,
            "--data",
            f"csv:{tmp_path / 'notes.csv'}",
            "--split",
            "test",
            "--json",
            out,
        )
        == 0
    )
    assert json.loads(out.read_text())["n"] == 3
