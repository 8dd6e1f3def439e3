"""The CPU loader: batch contract, deterministic disjoint per-rank batches, resume, bad samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unimlip_fast.config import DataConfig
from unimlip_fast.data import (
    CPULoader,
    DataError,
    DistributedBatchSampler,
    LoaderSpec,
    MaskingTables,
    build_dataset,
    build_eval_loader,
    decode_image,
    phantom_records,
    read_records,
    tokenize_captions,
)

from .helpers import wordpiece_tokenizer

SIZE, LENGTH = 32, 16


def build_loader(dataset, batch_size: int, **spec) -> CPULoader:
    """The cpu backend over ``dataset`` with views of SIZE; ``spec``: LoaderSpec fields."""
    return CPULoader(dataset, LoaderSpec(batch_size, SIZE, **spec))


@pytest.fixture
def tok(tmp_path):
    return wordpiece_tokenizer(tmp_path)


@pytest.fixture
def phantom_ds(tok):
    return build_dataset(phantom_records(24, seed=0, px=48), tok, SIZE, LENGTH)


def _files_dataset(tmp_path, n=8):
    """A jsonl data set of ``n`` small JPEGs; returns its folder."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / f"im{i}.jpg")
        rows.append(f'{{"image": "im{i}.jpg", "caption": "ct of the head showing {i % 3 + 1} lesions"}}')
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_tokenize_captions_dtypes(tok):
    ids, mask = tokenize_captions(tok, ["ct of the head", "", "mri " * 40], LENGTH)
    assert ids.shape == mask.shape == (3, LENGTH) and ids.dtype == np.int32 and mask.dtype == np.uint8
    assert mask[0].sum() == 6 and mask[2].sum() == LENGTH  # [CLS] ct of the head [SEP]; truncated
    assert ids[0, 0] == tok.cls_token_id and ids[0, 5] == tok.sep_token_id and ids[0, 6] == tok.pad_token_id


def test_two_ranks_are_disjoint_cover_the_epoch_and_match_one_process():
    n, b, world = 103, 8, 2
    ranks = [list(DistributedBatchSampler(n, b, r, world, seed=5, epoch=1)) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == n // (b * world)
    flat = [set(i for batch in r for i in batch) for r in ranks]
    assert not flat[0] & flat[1]
    assert len(flat[0] | flat[1]) == (n // (b * world)) * b * world
    assert all(len(batch) == b for r in ranks for batch in r)
    # One process with the global batch sees each step's rank batches concatenated.
    single = list(DistributedBatchSampler(n, b * world, 0, 1, seed=5, epoch=1))
    assert single == [r0 + r1 for r0, r1 in zip(*ranks)]
    # Epochs reshuffle; skip_batches resumes mid-epoch.
    assert list(DistributedBatchSampler(n, b, 0, world, seed=5, epoch=2)) != ranks[0]
    assert list(DistributedBatchSampler(n, b, 0, world, seed=5, epoch=1, skip_batches=2)) == ranks[0][2:]


def test_batch_contract_weak_only(phantom_ds):
    batch = next(iter(build_loader(phantom_ds, 4, seed=0, epoch=0)))
    assert set(batch) == {"image", "input_ids", "attention_mask", "index", "skipped"}
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    for key in ("input_ids", "attention_mask"):
        assert batch[key].shape == (4, LENGTH) and batch[key].dtype == torch.int64
    assert batch["index"].dtype == torch.int64 and batch["skipped"] == {}
    assert torch.equal(batch["input_ids"], torch.from_numpy(phantom_ds.input_ids[batch["index"].numpy()]).long())


def test_batch_contract_strong_views_and_mlm(phantom_ds, tok):
    tables = MaskingTables.from_tokenizer(tok)
    loader = build_loader(phantom_ds, 4, seed=0, epoch=0, strong_views=True, mlm=tables, mlm_prob=0.15)
    batch = next(iter(loader))
    assert set(batch) == {
        "image",
        "image_a",
        "image_b",
        "input_ids",
        "attention_mask",
        "mlm_labels",
        "index",
        "skipped",
    }
    for key in ("image", "image_a", "image_b"):
        assert batch[key].shape == (4, 3, SIZE, SIZE) and batch[key].dtype == torch.float32
    assert not torch.allclose(batch["image_a"], batch["image_b"])
    assert batch["mlm_labels"].dtype == torch.int64 and (batch["mlm_labels"] != -100).any(dim=1).all()
    original = torch.from_numpy(phantom_ds.input_ids[batch["index"].numpy()]).long()
    chosen = batch["mlm_labels"] != -100
    assert torch.equal(batch["mlm_labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])


def test_batches_are_reproducible_and_resume_mid_epoch(phantom_ds, tok):
    tables = MaskingTables.from_tokenizer(tok)
    kw = dict(seed=3, epoch=1, strong_views=True, mlm=tables)
    full = list(build_loader(phantom_ds, 4, **kw))
    again = list(build_loader(phantom_ds, 4, **kw))
    resumed = list(build_loader(phantom_ds, 4, skip_batches=2, **kw))
    assert len(full) == 6 and len(resumed) == 4
    for a, b in zip(full[2:], resumed):
        for key in ("image", "image_a", "input_ids", "mlm_labels", "index"):
            assert torch.equal(a[key], b[key])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again))
    other_epoch = next(iter(build_loader(phantom_ds, 4, seed=3, epoch=2)))
    assert not torch.equal(other_epoch["index"], full[0]["index"])


def test_worker_count_does_not_change_batches(phantom_ds):
    a = list(build_loader(phantom_ds, 8, seed=1, epoch=0, strong_views=True, num_workers=0))
    b = list(build_loader(phantom_ds, 8, seed=1, epoch=0, strong_views=True, num_workers=1))
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image_b"], y["image_b"])


def test_corrupt_and_vanished_images_are_substituted_and_counted(tmp_path, tok):
    root = _files_dataset(tmp_path)
    records = read_records(DataConfig(format="pmc-oa", path=str(root)))
    (root / "im2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # undecodable
    (root / "im5.jpg").unlink()  # gone after the records were read
    (root / "im6.jpg").write_bytes((root / "im6.jpg").read_bytes()[:200])  # truncated
    ds = build_dataset(records, tok, SIZE, LENGTH)
    batches = list(build_loader(ds, 8, seed=0, epoch=0))
    (batch,) = batches
    assert batch["image"].shape[0] == 8  # the batch keeps its size
    assert batch["skipped"] == {"undecodable_image": 2, "missing_image": 1}
    used = batch["index"].tolist()
    assert not {2, 5, 6} & set(used) and set(used) <= {0, 1, 3, 4, 7}
    # The eval loader substitutes the same way and says so.
    evals = list(build_eval_loader(ds, 3))
    assert sum(sum(b["skipped"].values()) for b in evals) == 3
    assert [len(b["index"]) for b in evals] == [3, 3, 2]


def test_cached_images_give_the_same_batches(tmp_path, tok):
    root = _files_dataset(tmp_path)
    records = read_records(DataConfig(format="pmc-oa", path=str(root)))
    (root / "im3.jpg").write_bytes(b"garbage")
    plain = build_dataset(records, tok, SIZE, LENGTH)
    cached = build_dataset(records, tok, SIZE, LENGTH, cache_images=True)
    assert cached.load_image(0).shape == (37, 46, 3)  # 40x50 decoded with the short side at 1.15 x 32
    a = list(build_loader(plain, 4, seed=0, epoch=0))
    b = list(build_loader(cached, 4, seed=0, epoch=0))
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
        assert x["skipped"] == y["skipped"]
    assert sum(sum(x["skipped"].values()) for x in b) == 1
    for path in root.glob("*.jpg"):
        path.unlink()  # the cache no longer needs the files
    c = list(build_loader(cached, 4, seed=0, epoch=0))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(b, c))


def test_eval_loader_in_order_unmasked(phantom_ds):
    batches = list(build_eval_loader(phantom_ds, 10))
    assert [b["index"].tolist() for b in batches] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 24))]
    assert set(batches[0]) == {"image", "input_ids", "attention_mask", "index", "skipped"}
    assert torch.equal(batches[0]["input_ids"], torch.from_numpy(phantom_ds.input_ids[:10]).long())
    assert torch.equal(batches[0]["image"], next(iter(build_eval_loader(phantom_ds, 10)))["image"])


def test_decode_shrinks_early_and_stretches_16_bit(tmp_path):
    big = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg")
    out = decode_image(str(tmp_path / "big.jpg"), 37)
    assert out.dtype == np.uint8 and out.shape == (37, 49, 3)
    small = decode_image(str(tmp_path / "big.jpg"), 1000)
    assert small.shape == (300, 400, 3)  # never enlarged
    wide = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    deep = decode_image(str(tmp_path / "deep.png"), 64)
    assert deep.shape == (64, 64, 3) and deep.min() == 0 and deep.max() == 255  # stretched, not clipped


def test_too_small_for_one_global_batch_is_a_clear_error(phantom_ds):
    with pytest.raises(DataError, match="do not fill one global batch"):
        build_loader(phantom_ds, 8, rank=0, world_size=4)


def test_nothing_loadable_is_a_clear_error(tmp_path, tok):
    root = _files_dataset(tmp_path, n=4)
    records = read_records(DataConfig(format="pmc-oa", path=str(root)))
    for path in root.glob("*.jpg"):
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="failed to load"):
        next(iter(build_loader(build_dataset(records, tok, SIZE, LENGTH), 2)))


def test_the_cpu_loader_says_how_many_workers_in_words(phantom_ds):
    from .helpers import train_loader

    described = {n: train_loader("cpu", phantom_ds, batch=8, num_workers=n).description for n in (0, 1, 2)}
    assert described[0].endswith("in the training process (as configured)")
    assert described[1].endswith("in 1 worker (as configured)")
    assert described[2].endswith("in 2 workers (as configured)")
