"""Damaged shards never end a run: token ids outside the vocabulary skipped and counted (when a
shard is verified, and per sample when read), a missing index rebuilt from its tar, and
``data verify`` naming the samples changed in place."""
import json
import os

import numpy as np
import pytest

from unimlip_fast.data.shards import ShardDataset, open_shards

from .helpers import N_PACKED, copy_packed, epoch, first_member_names, pack_medpix, rewrite_shard, run_cli, shard_loader


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
    ids = np.frombuffer((copy / "shard-000000.tar").read_bytes()[offset:offset + size], "<i4").copy()
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
