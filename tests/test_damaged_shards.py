"""Damaged shards never end a run: token ids outside the vocabulary skipped and counted (when a
shard is verified, and per sample when read), a missing index rebuilt from its tar, and
``data verify`` naming the samples changed in place."""

import json
import os

import numpy as np
import pytest

from unimlip_fast.data.shards import ShardDataset, open_shards

from .helpers import (
    N_PACKED,
    copy_packed,
    epoch,
    first_member_names,
    pack_medpix,
    rewrite_shard,
    run_args,
    run_cli,
    shard_loader,
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_medpix(tmp_path_factory.mktemp("damaged_shards"))


def vocab_size(shards) -> int:
    return json.loads((shards / "manifest.json").read_text())["tokenizer"]["vocab_size"]


def member(shards, key: str, ext: str, shard: int = 0) -> tuple[int, int]:
    """(data offset, size) of ``<key>.<ext>`` in a shard, from its index."""
    for line in (shards / f"shard-{shard:06d}.idx").read_text().split("\n")[1:]:
        parts = line.split()
        for k in range(0, len(parts), 4):
            if parts[k + 3] == f"{key}.{ext}":
                return int(parts[k + 1]), int(parts[k + 2])
    raise KeyError(key)


def patch_in_place(tar, offset: int, data: bytes) -> None:
    """Overwrite bytes of a tar keeping its size and mtime: what opening a folder cannot see."""
    st = tar.stat()
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_ids_outside_the_vocabulary_are_counted_when_a_shard_is_verified(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    key = first_member_names(copy)[5]
    offset, size = member(copy, key, "ids")
    ids = np.frombuffer((copy / "shard-000000.tar").read_bytes()[offset : offset + size], "<i4").copy()
    ids[1] = vocab_size(copy) + 7
    rewrite_shard(copy / "shard-000000.tar", replace={f"{key}.ids": ids.tobytes()})
    shards = open_shards(copy)
    assert dict(shards.read_skipped) == {"bad_token_ids": 1} and len(shards) == N_PACKED - 1
    assert int(key) not in set(shards.samples["index"].tolist())


@pytest.mark.parametrize("backend", ["torch"])
def test_ids_damaged_in_place_are_skipped_per_sample(backend, packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    key = first_member_names(copy)[2]
    offset, size = member(copy, key, "ids")
    patch_in_place(copy / "shard-000000.tar", offset, np.array([-3], "<i4").tobytes())
    shards = open_shards(copy)
    assert not shards.read_skipped and len(shards) == N_PACKED  # size and mtime kept: not re-verified
    j = int(np.flatnonzero(shards.samples["index"] == int(key))[0])
    with pytest.raises(ValueError, match="bad_token_ids"):
        ShardDataset(shards, 8).read_ids(j)
    batches = epoch(shard_loader(backend, copy, batch=8))
    counted = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            counted[reason] = counted.get(reason, 0) + n
    assert counted == {"bad_token_ids": 1}
    assert all(int(ids.max()) < vocab_size(copy) for b in batches for ids in b["input_ids"])


def test_a_missing_index_is_rebuilt_from_the_tar(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    whole = open_shards(copy)
    (copy / "shard-000001.idx").unlink()
    shards = open_shards(copy)
    assert shards.rebuilt == ["shard-000001.tar"] and not shards.read_skipped
    assert shards.samples["index"].tolist() == whole.samples["index"].tolist()
    assert len(epoch(shard_loader("torch", copy, batch=8))) == N_PACKED // 8


def test_data_verify_names_the_samples_changed_in_place(packed, tmp_path, monkeypatch, capsys):
    copy = copy_packed(packed, tmp_path / "copy")
    assert run_cli(monkeypatch, "data", "verify", copy) == 0
    assert "3 of 3 shards unchanged" in capsys.readouterr().err
    key = first_member_names(copy, shard=1)[4]
    offset, size = member(copy, key, "jpg", shard=1)
    patch_in_place(copy / "shard-000001.tar", offset + size // 2, b"\x00\x01\x02")
    assert not open_shards(copy).read_skipped  # invisible to a start...
    assert run_cli(monkeypatch, "data", "verify", copy) == 1  # ...but not to verify
    err = capsys.readouterr().err
    assert f"shard-000001.tar: 1 changed: {key}" in err and "1 of 3 shards changed or damaged" in err


def header_offset(shards, key: str, ext: str, shard: int) -> int:
    """Where ``<key>.<ext>``'s 512-byte tar header starts (USTAR, no long names: just before its data)."""
    return member(shards, key, ext, shard)[0] - 512


def test_a_damaged_header_loses_one_sample_and_the_rest_of_the_shard_is_kept(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    keys = first_member_names(copy, shard=1)
    middle = keys[len(keys) // 2]
    tar = copy / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    start = header_offset(copy, middle, "jpg", 1)
    data[start : start + 100] = bytes(b ^ 0xFF for b in data[start : start + 100])
    tar.write_bytes(bytes(data))
    shards = open_shards(copy)
    assert dict(shards.read_skipped) == {"missing_image": 1} and len(shards) == N_PACKED - 1
    kept = set(shards.samples["index"].tolist())
    assert {int(k) for k in keys if k != middle} <= kept and int(middle) not in kept  # those after it too
    assert shards.damage_note() == "shard-000001.tar: 1 missing_image"


def test_samples_lost_to_damage_are_counted_against_the_manifest_with_the_shard_named(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    keys = first_member_names(copy, shard=1)
    tar = copy / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    # every member of two samples in the middle overwritten (headers and data): nothing of them remains
    start, end = header_offset(copy, keys[10], "jpg", 1), header_offset(copy, keys[12], "jpg", 1)
    data[start:end] = b"\x5a" * (end - start)
    tar.write_bytes(bytes(data))
    shards = open_shards(copy)
    assert dict(shards.read_skipped) == {"missing_in_shard": 2} and len(shards) == N_PACKED - 2
    assert {int(k) for k in keys[12:]} <= set(shards.samples["index"].tolist())
    assert shards.skipped_by_shard == {"shard-000001.tar": {"missing_in_shard": 2}}


def test_a_truncated_shard_counts_each_sample_it_lost(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    keys = first_member_names(copy, shard=1)
    tar = copy / "shard-000001.tar"
    with open(tar, "r+b") as f:
        f.truncate(header_offset(copy, keys[30], "jpg", 1))
    shards = open_shards(copy)
    assert dict(shards.read_skipped) == {"missing_in_shard": len(keys) - 30}
    assert len(shards) == N_PACKED - (len(keys) - 30)


def test_an_index_cached_by_the_older_scan_is_made_again(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    keys = first_member_names(copy, shard=1)
    tar = copy / "shard-000001.tar"
    with open(tar, "r+b") as f:
        f.truncate(header_offset(copy, keys[30], "jpg", 1))
    open_shards(copy)
    meta = copy / ".verified" / "shard-000001.json"
    old = json.loads(meta.read_text())
    old.pop("scan")
    meta.write_text(json.dumps({**old, "skipped": {}}))  # what the older scan cached: nothing counted
    assert dict(open_shards(copy).read_skipped) == {"missing_in_shard": len(keys) - 30}


def test_crafted_member_names_and_links_are_skipped_and_counted_never_followed(packed, tmp_path):
    import io
    import tarfile

    copy = copy_packed(packed, tmp_path / "copy")
    tar_path = copy / "shard-000000.tar"
    with tarfile.open(tar_path, "a", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("../../000000777.jpg", "/abs/path.jpg", "pwned_sample.jpg", ".hidden.jpg", "sub/000000778.ids"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("000000779.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("000000780.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, first_member_names(copy)[0] + ".jpg"
        tar.addfile(hard)
    before = set(os.listdir(tmp_path))
    shards = open_shards(copy)
    assert dict(shards.read_skipped) == {"bad_member": 7} and len(shards) == N_PACKED
    assert shards.skipped_by_shard == {"shard-000000.tar": {"bad_member": 7}}
    assert not {777, 778, 779, 780} & set(shards.samples["index"].tolist())
    assert set(os.listdir(tmp_path)) == before and not (tmp_path / "x").exists()
    batches = epoch(shard_loader("torch", copy, batch=8))
    assert sum(len(b["index"]) for b in batches) == N_PACKED


def test_training_on_a_damaged_shard_names_it_in_the_log_and_the_summary(packed, tmp_path, monkeypatch, capsys):
    copy = copy_packed(packed, tmp_path / "copy")
    keys = first_member_names(copy, shard=1)
    with open(copy / "shard-000001.tar", "r+b") as f:
        f.truncate(header_offset(copy, keys[30], "jpg", 1))
    run = tmp_path / "run"
    args = [a for a in run_args(copy, "torch", run) if a != "train.max_steps=4"] + ["train.max_steps=2"]
    assert run_cli(monkeypatch, *args) == 0
    lost = len(keys) - 30
    assert f"shard-000001.tar: {lost} missing_in_shard" in capsys.readouterr().err.replace("\n", " ")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_by_shard"] == {"shard-000001.tar": {"missing_in_shard": lost}}
    assert summary["skipped_samples"] == {"missing_in_shard": lost}


def test_shards_with_the_cpu_backend_are_refused_in_one_line(packed, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert run_cli(monkeypatch, *run_args(packed, "cpu", run)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.shards=") and "data.backend=torch, dali or auto" in err
    assert len(err.splitlines()) == 1 and not run.exists()
