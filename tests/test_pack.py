"""`data pack`: shard contents, DALI index files, manifest, bad records, resuming, the CLI."""

import json
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from unimlip_fast.cli import main
from unimlip_fast.config import DataConfig
from unimlip_fast.data.pack import PackOptions, pack
from unimlip_fast.data.records import DataError
from unimlip_fast.data.sources import read_records

from .helpers import CAPTIONS, CONTEXT, manifest, medpix_path, pack_medpix, tiny_tokenizer_dir, tokenised_captions


def _jsonl_dataset(root, tokenizer_dir):
    """Six pairs: four good (a JPEG and a PNG among them), a corrupt image, an empty caption."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        ext, fmt = ("png", "PNG") if i == 1 else ("jpg", "JPEG")
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(images / f"im{i}.{ext}", fmt)
        rows.append({"image": f"im{i}.{ext}", "caption": CAPTIONS[i]})
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append({"image": "bad.jpg", "caption": CAPTIONS[5]})
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(images / "e.jpg")
    rows.append({"image": "e.jpg", "caption": "   "})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return DataConfig(format="jsonl", path=str(root / "pairs.jsonl"), image_root=str(images), split="all")


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_pack_writes_bytes_ids_index_and_manifest(tmp_path, tiny_tokenizer):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    data = _jsonl_dataset(tmp_path, tok_dir)
    out = tmp_path / "packed"
    m = pack(data, out, str(tok_dir), options=PackOptions(shard_size=3, context_length=CONTEXT, progress=False))

    records = read_records(data, "all").items  # the empty caption is skipped by the reader
    assert m["n_records"] == 5 and m["n_samples"] == 4 and len(m["shards"]) == 2
    assert m["skipped"] == {"empty_caption": 1, "undecodable_image": 1}
    assert m["pack_skipped"] == {"undecodable_image": 1}
    assert m["tokenizer"]["vocab_size"] == len(tiny_tokenizer) and m["tokenizer"]["context_length"] == CONTEXT
    members = {}
    for shard in m["shards"]:
        tar_members = _members(out / shard["tar"])
        members.update(tar_members)
        # The index is DALI's v1.2 format and its offsets point at each member's bytes.
        lines = (out / shard["index"]).read_text().strip().split("\n")
        assert lines[0] == f"v1.2 {shard['samples']}"
        raw = (out / shard["tar"]).read_bytes()
        for line in lines[1:]:
            parts = line.split()
            for k in range(0, len(parts), 4):
                ext, off, size, name = parts[k], int(parts[k + 1]), int(parts[k + 2]), parts[k + 3]
                assert name.endswith("." + ext) and raw[off : off + size] == tar_members[name]
    for i, r in enumerate(records):
        base = f"{i:09d}"
        if r.image.endswith("bad.jpg"):
            assert not any(k.startswith(base) for k in members)
            continue
        ext = r.image.rsplit(".", 1)[1]
        assert members[f"{base}.{ext}"] == open(r.image, "rb").read()  # original bytes, original extension
        ids = np.frombuffer(members[f"{base}.ids"], "<i4").tolist()
        assert ids == tiny_tokenizer(r.caption, truncation=True, max_length=CONTEXT)["input_ids"]
        assert np.frombuffer(members[f"{base}.idx"], "<i8")[0] == i
        assert members[f"{base}.txt"].decode() == r.caption and members[f"{base}.key"].decode() == r.key


def test_pack_resumes_and_refuses_another_plan(tmp_path, tiny_tokenizer):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    data = _jsonl_dataset(tmp_path, tok_dir)
    out = tmp_path / "packed"
    pack(data, out, str(tok_dir), options=PackOptions(shard_size=2, context_length=CONTEXT, progress=False))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000001.json").unlink()  # as if interrupted while packing shard 1
    m = pack(data, out, str(tok_dir), options=PackOptions(shard_size=2, context_length=CONTEXT, progress=False))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # kept
    assert after["shard-000001.tar"] != before["shard-000001.tar"]  # repacked
    assert m["n_samples"] == 4
    with pytest.raises(DataError, match="different plan"):
        pack(data, out, str(tok_dir), options=PackOptions(shard_size=3, context_length=CONTEXT, progress=False))


def test_pack_medpix_keeps_every_caption_s_ids(tmp_path):
    shards = pack_medpix(tmp_path, n=60, shard_size=25)
    m = manifest(shards)
    assert m["n_samples"] == 60 and [s["samples"] for s in m["shards"]] == [25, 25, 10]
    expected = tokenised_captions(shards)
    assert sorted(expected) == list(range(60))
    for s in m["shards"]:
        members = _members(shards / s["tar"])
        for name, data in members.items():
            if name.endswith(".ids"):
                assert np.frombuffer(data, "<i4").tolist() == expected[int(name[:9])][0]


def test_cli_data_pack(tmp_path, monkeypatch, capsys):
    out = tmp_path / "packed"
    args = [
        "unimlip-fast",
        "data",
        "pack",
        "--format",
        "medpix",
        "--input",
        str(medpix_path()),
        "--output",
        str(out),
        "--split",
        "test",
        "--shard-size",
        "150",
        "--tokenizer",
        str(tiny_tokenizer_dir(tmp_path)),
        "--context-length",
        str(CONTEXT),
        "--workers",
        "2",
    ]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    assert e.value.code == 0
    m = manifest(out)
    assert m["n_samples"] == 199 and len(m["shards"]) == 2 and "199 samples in 2 shards" in capsys.readouterr().err

    monkeypatch.setattr(sys, "argv", args[:-6] + ["--tokenizer", "random-bert"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "tokenizer folder" in err and "Traceback" not in err

    monkeypatch.setattr(sys, "argv", args[:-6] + ["--tokenizer", str(tmp_path / "no_such_tokenizer")])
    with pytest.raises(SystemExit) as e:
        main()
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert e.value.code == 1 and "no such folder" in err and "no_such_tokenizer" in err
