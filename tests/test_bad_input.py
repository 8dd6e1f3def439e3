"""Bad input through the real entry point: skipped and counted, or one clear error; never a crash mid-run."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from unimlip_fast.data.phantom import phantom_split
from unimlip_fast.train import engine

from .helpers import REPO, TINY_RUN, run_cli


def write_csv_dataset(root, n_good=40):
    images = root / "images"
    images.mkdir(parents=True)
    rows = ["file,text"]
    for i, record in enumerate(phantom_split(n_good, "train").items):
        Image.fromarray(np.ascontiguousarray(record.image)).save(images / f"img{i}.png")
        rows.append(f'images/img{i}.png,"{record.caption}"')
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [
        "images/corrupt.jpg,a ct of the head with a lesion",
        "images/missing.png,an mri of the chest",
        "images/img0.png,",
        "images/img1.png,   ",
    ]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def test_corrupt_missing_and_empty_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    table = write_csv_dataset(tmp_path / "data")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "data" / "images" / "huge.png")
    with open(table, "a") as f:
        f.write("images/huge.png,a scan above the pixel limit\n")
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        code = run_cli(
            monkeypatch,
            "pretrain",
            REPO / "configs/demo.yaml",
            "--run-dir",
            run,
            *TINY_RUN,
            "data.format=csv",
            f"data.path={table}",
            "data.image_key=file",
            "data.caption_key=text",
            "data.split=",
            "train.batch_size=8",
            "train.max_steps=10",
            "eval.split=",
            "data.max_image_pixels=50000",
        )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_records"] == {"missing_image": 1, "empty_caption": 2}
    # each bad file once over two epochs: the corrupt JPEG, the image above the pixel limit
    assert summary["skipped_samples"] == {"undecodable_image": 1, "too_large": 1}
    assert summary["steps"] == 10
    assert "missing_image" in capsys.readouterr().err


def test_nothing_left_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "pairs.csv").write_text("file,text\nnope.png,a caption\nnada.jpg,another\n")
    code = run_cli(
        monkeypatch,
        "pretrain",
        REPO / "configs/demo.yaml",
        "--run-dir",
        tmp_path / "run",
        *TINY_RUN,
        "data.format=csv",
        f"data.path={tmp_path / 'pairs.csv'}",
        "data.image_key=file",
        "data.caption_key=text",
        "data.split=",
    )
    err = capsys.readouterr().err
    assert code != 0 and "missing_image" in err and "Traceback" not in err


def _poison(steps_to_poison):
    real = engine.compute_terms
    calls = {"n": 0}

    def compute_terms(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in steps_to_poison:
            terms["itc"] = terms["itc"] * float("nan")
        return terms

    return compute_terms


def test_a_nonfinite_loss_skips_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "compute_terms", _poison({2}))
    run = tmp_path / "run"
    assert (
        run_cli(
            monkeypatch,
            "pretrain",
            REPO / "configs/demo.yaml",
            "--run-dir",
            run,
            *TINY_RUN,
            "train.max_steps=4",
            "eval.split=",
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 4
    assert all(
        np.isfinite(v)
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        for k, v in m.items()
        if k.startswith("loss/")
    )


def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "compute_terms", _poison(set(range(1, 100))))
    code = run_cli(
        monkeypatch,
        "pretrain",
        REPO / "configs/demo.yaml",
        "--run-dir",
        tmp_path / "run",
        *TINY_RUN,
        "train.max_steps=10",
        "train.max_nonfinite=3",
        "eval.split=",
    )
    err = capsys.readouterr().err
    assert code != 0 and "3 non-finite steps in a row" in err


def test_every_image_undecodable_is_one_line_not_a_worker_traceback(tmp_path, monkeypatch, capsys):
    rows = ["file,text"]
    for i in range(20):
        (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG not an image")
        rows.append(f"bad{i}.png,a ct of the chest number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    code = run_cli(
        monkeypatch,
        "pretrain",
        REPO / "configs/demo.yaml",
        "--run-dir",
        tmp_path / "run",
        *TINY_RUN,
        "data.format=csv",
        f"data.path={tmp_path / 'pairs.csv'}",
        "data.image_key=file",
        "data.caption_key=text",
        "data.split=",
        "data.num_workers=1",
        "train.batch_size=8",
        "train.max_steps=2",
        "eval.split=",
    )
    err = capsys.readouterr().err.strip().splitlines()
    error_lines = [line for line in err if line.startswith("error:")]
    assert code == 1 and len(error_lines) == 1 and err[-1] == error_lines[0]
    assert "DataLoader worker" not in err[-1] and "Traceback" not in "\n".join(err)


def test_a_header_only_csv_says_it_has_no_rows_not_that_images_are_missing(tmp_path):
    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.records import DataError
    from unimlip_fast.data.sources import read_records

    (tmp_path / "pairs.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match=r"skipped: no rows at all\)$"):
        read_records(DataConfig(format="csv", path=str(tmp_path / "pairs.csv")), None)
