"""embed and search: parts with keys, bad images counted, resume by part, packed shards, parquet."""

import json
import shutil

import numpy as np
import pytest

import unimlip_fast
from unimlip_fast.config import DataConfig
from unimlip_fast.data.records import DataError
from unimlip_fast.embed import EmbedOptions, embed_to_index, iter_part_embeddings, records_source, search_index

from .helpers import run_cli

CAPTIONS = [
    "ct of the chest showing one small lesion",
    "mri of the head with two large lesions",
    "ct of the abdomen, no lesion",
    "mri of the chest showing one large lesion",
    "ct of the head with two small lesions",
    "mri of the abdomen showing one lesion",
    "ct of the chest, normal",
]


@pytest.fixture(scope="module")
def table(image_folder, tmp_path_factory):
    """A CSV of the six scans and the file that is not an image, one caption each."""
    names = sorted(p.name for p in image_folder.glob("scan*")) + ["broken.png"]
    folder = tmp_path_factory.mktemp("csv")
    for name in names:
        shutil.copy(image_folder / name, folder / name)
    rows = ["image,caption"] + [f'{n},"{c}"' for n, c in zip(names, CAPTIONS)]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def model(tiny_run):
    return unimlip_fast.load(tiny_run, device="cpu")


def read_all(folder, kind):
    rows, keys, captions = [], [], []
    for r, k, c in iter_part_embeddings(folder, kind):
        rows.append(np.asarray(r))
        keys += k
        captions += c
    return np.concatenate(rows), keys, captions


def test_embed_cli_writes_parts_counts_bad_images_and_searches(tiny_run, table, model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "index"
    assert (
        run_cli(
            monkeypatch,
            "embed",
            "--checkpoint",
            tiny_run,
            "--data",
            f"csv:{table}",
            "--output",
            out,
            "--part-size",
            3,
            "--batch-size",
            2,
            "--workers",
            0,
            "--device",
            "cpu",
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "6 images and 7 captions in 3 parts" in err and "undecodable_image=1" in err
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and [p["n_records"] for p in index["parts"]] == [3, 3, 1]
    assert index["skipped"] == {"undecodable_image": 1} and index["n_images"] == 6 and index["n_texts"] == 7

    images, image_keys, _ = read_all(out, "image")
    texts, text_keys, captions = read_all(out, "text")
    assert len(image_keys) == 6 and not any(k.endswith("broken.png") for k in image_keys)
    assert captions == CAPTIONS and len(text_keys) == 7
    np.testing.assert_allclose(images, model.encode_image([table.parent / k for k in image_keys]).numpy(), atol=1e-5)
    np.testing.assert_allclose(texts, model.encode_text(CAPTIONS).numpy(), atol=1e-5)

    # search: the best image for a caption is the brute-force argmax over the index, best first
    query = model.encode_text(CAPTIONS[2])[0]
    hits = search_index(out, query, "image", k=4)
    score_of = dict(zip(image_keys, (images @ query.numpy()).tolist()))
    np.testing.assert_allclose([h["score"] for h in hits], sorted(score_of.values(), reverse=True)[:4], atol=1e-6)
    np.testing.assert_allclose([h["score"] for h in hits], [score_of[h["key"]] for h in hits], atol=1e-6)
    assert [h["caption"] for h in hits] == [captions[text_keys.index(h["key"])] for h in hits]
    results = tmp_path / "hits.json"
    assert (
        run_cli(
            monkeypatch, "search", "--index", out, "--text", CAPTIONS[2], "-k", 4, "--json", results, "--device", "cpu"
        )
        == 0
    )
    assert [h["key"] for h in json.loads(results.read_text())] == [h["key"] for h in hits]
    assert (
        run_cli(
            monkeypatch,
            "search",
            "--index",
            out,
            "--image",
            table.parent / image_keys[0],
            "-k",
            2,
            "--json",
            results,
            "--device",
            "cpu",
        )
        == 0
    )
    text_scores = texts @ images[0]
    nearest = [captions[i] for i in np.argsort(-text_scores)[:2]]
    assert [h["caption"] for h in json.loads(results.read_text())] == nearest


class Stop(Exception):
    pass


def test_stopped_embed_resumes_by_part(table, model, tmp_path):
    items, n, skipped = records_source(DataConfig(format="csv", path=str(table)), None)
    items = list(items)

    def stopping(items, after):
        for i, item in enumerate(items):
            if i == after:
                raise Stop
            yield item

    out = tmp_path / "index"
    with pytest.raises(Stop):
        embed_to_index(model, stopping(items, 5), n, "csv", out, skipped, EmbedOptions(part_size=2, batch_size=2))
    index = json.loads((out / "index.json").read_text())
    assert not index["complete"] and [p["part"] for p in index["parts"]] == [0, 1]
    first = (out / "part-00000.image.npy").stat().st_mtime_ns
    seen = []
    index = embed_to_index(
        model,
        stopping(items, None),
        n,
        "csv",
        out,
        skipped,
        EmbedOptions(part_size=2, batch_size=2, progress=lambda done, total: seen.append(done)),
    )
    assert index["complete"] and [p["part"] for p in index["parts"]] == [0, 1, 2, 3]
    assert (out / "part-00000.image.npy").stat().st_mtime_ns == first  # not embedded again
    assert seen[0] == 4 and seen[-1] == 7
    whole = tmp_path / "whole"
    embed_to_index(model, items, n, "csv", whole, skipped, EmbedOptions(part_size=2, batch_size=3))
    for kind in ("image", "text"):
        a, b = read_all(out, kind), read_all(whole, kind)
        assert a[1] == b[1]
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    with pytest.raises(DataError, match="part_size"):
        embed_to_index(model, items, n, "csv", out, skipped, EmbedOptions(part_size=3))


def test_embed_from_packed_shards_equals_embed_from_records(tiny_run, table, model, tmp_path, monkeypatch):
    from unimlip_fast.data.pack import PackOptions, pack

    packed = tmp_path / "packed"
    pack(
        DataConfig(format="csv", path=str(table)),
        packed,
        str(tiny_run / "tokenizer"),
        None,
        PackOptions(shard_size=4, context_length=24, workers=1, shuffle_seed=None),
    )
    out = tmp_path / "index"
    assert (
        run_cli(
            monkeypatch,
            "embed",
            "--checkpoint",
            tiny_run,
            "--shards",
            packed,
            "--output",
            out,
            "--part-size",
            4,
            "--workers",
            0,
            "--device",
            "cpu",
        )
        == 0
    )
    images, keys, captions = read_all(out, "image")
    assert len(keys) == 6  # packing already dropped the file that is not an image
    np.testing.assert_allclose(images, model.encode_image([table.parent / k for k in keys]).numpy(), atol=1e-5)
    texts, text_keys, _ = read_all(out, "text")
    assert text_keys == keys
    np.testing.assert_allclose(texts, model.encode_text(captions).numpy(), atol=1e-5)


def test_embed_parquet(table, model, tmp_path):
    pytest.importorskip("pyarrow", reason="parquet output needs pyarrow")
    items, n, skipped = records_source(DataConfig(format="csv", path=str(table)), None)
    items = list(items)
    embed_to_index(model, items, n, "csv", tmp_path / "pq", skipped, EmbedOptions(part_size=4, storage="parquet"))
    embed_to_index(model, items, n, "csv", tmp_path / "np", skipped, EmbedOptions(part_size=4, storage="npy"))
    for kind in ("image", "text"):
        a, b = read_all(tmp_path / "pq", kind), read_all(tmp_path / "np", kind)
        assert a[1:] == b[1:]
        np.testing.assert_array_equal(a[0], b[0])


def test_embed_bad_arguments_are_one_line(tiny_run, table, tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, "embed", "--checkpoint", tiny_run, "--output", tmp_path / "x") != 0
    assert "exactly one of --data" in capsys.readouterr().err
    assert run_cli(monkeypatch, "search", "--index", tmp_path / "nothing", "--text", "ct") != 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "not an embedding index" in err and "Traceback" not in err


def test_embed_with_no_image_embedded_fails_in_one_line(tiny_run, table, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for k in range(3):
        (folder / f"bad{k}.png").write_bytes(b"not an image")
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(f'bad{k}.png,"{CAPTIONS[k]}"\n' for k in range(3)))
    code = run_cli(
        monkeypatch,
        "embed",
        "--checkpoint",
        tiny_run,
        "--data",
        f"csv:{folder / 'pairs.csv'}",
        "--output",
        tmp_path / "index",
        "--workers",
        0,
        "--device",
        "cpu",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: no image could be embedded (skipped: undecodable_image=3)")
