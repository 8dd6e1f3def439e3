"""Packed shards read back, and the GPU backends on them, each test parametrised over ``torch``
(decode in workers, views as batched tensor ops) and ``dali`` (skipped where nvidia.dali does not
import): the batch contract, determinism, ranks, bad samples inside a shard, ids unchanged, resume,
a run."""

import json
import sys

import pytest
import torch

from unimlip_fast.cli import main
from unimlip_fast.data.backends import resolve_backend
from unimlip_fast.data.dali import dali_available
from unimlip_fast.data.records import DataError
from unimlip_fast.data.shards import check_against_dataset, open_shards
from unimlip_fast.data.spec import LoaderSpec
from unimlip_fast.data.torch_loader import TorchLoader, canvas, make_views
from unimlip_fast.data.views import ViewRecipe, crop_boxes, random_resized_crop_boxes

from .helpers import (
    CONTEXT,
    GPU_BACKENDS,
    IMAGE_SIZE,
    N_PACKED,
    B,
    check_contract,
    copy_packed,
    epoch,
    first_member_names,
    pack_medpix,
    rewrite_shard,
    run_args,
    same_batches,
    shard_loader,
    tokenised_captions,
    train_loader,
    unpadded,
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_medpix(tmp_path_factory.mktemp("medpix_shards"))


@pytest.fixture(scope="module")
def mlm_tables(packed):
    from transformers import AutoTokenizer

    from unimlip_fast.data.masking import MaskingTables

    return MaskingTables.from_tokenizer(AutoTokenizer.from_pretrained(str(packed / "tokenizer")))


# ------------------------------------------------------------------------ every GPU backend


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_contract_and_phases(backend, packed, mlm_tables):
    warm = epoch(shard_loader(backend, packed, mlm=mlm_tables))
    assert len(warm) == N_PACKED // B
    for batch in warm:
        check_contract(batch, B, strong=False, mlm=True)
    strong = epoch(shard_loader(backend, packed, strong_views=True, dtype=torch.bfloat16))
    for batch in strong:
        check_contract(batch, B, strong=True, mlm=False, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_same_seed_same_batches(backend, packed):
    a = epoch(shard_loader(backend, packed, seed=3, epoch=1, strong_views=True))
    b = epoch(shard_loader(backend, packed, seed=3, epoch=1, strong_views=True))
    c = epoch(shard_loader(backend, packed, seed=3, epoch=2, strong_views=True))
    assert same_batches(a, b)
    assert not same_batches(a, c)
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]  # reshuffled per epoch


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_two_ranks_disjoint_and_covering(backend, packed):
    seen = []
    for rank in range(2):
        batches = epoch(shard_loader(backend, packed, batch=8, rank=rank, world_size=2, seed=5))
        assert len(batches) == N_PACKED // 16  # the same count on every rank
        seen.append([i for b in batches for i in b["index"].tolist()])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_PACKED))  # 96 = 6 global batches of 16: nothing dropped


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ids_unchanged(backend, packed):
    expected = tokenised_captions(packed)
    got = {}
    for batch in epoch(shard_loader(backend, packed)):
        for i, ids in zip(batch["index"].tolist(), unpadded(batch["input_ids"], batch["attention_mask"])):
            got[i] = ids
    assert sorted(got) == list(range(N_PACKED))
    assert all(got[i] == expected[i][0] for i in got)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bad_samples_inside_a_shard(backend, packed, tmp_path):
    packed_copy = copy_packed(packed, tmp_path / "copy")
    names = first_member_names(packed_copy)
    corrupt, no_caption = names[3], names[7]
    rewrite_shard(packed_copy / "shard-000000.tar", corrupt={f"{corrupt}.jpg"}, drop={f"{no_caption}.ids"})
    shards = open_shards(packed_copy)
    assert dict(shards.read_skipped) == {"undecodable_image": 1, "missing_caption": 1}
    assert len(shards) == N_PACKED - 2
    batches = epoch(shard_loader(backend, packed_copy, batch=8))
    assert batches[0]["skipped"] == {"undecodable_image": 1, "missing_caption": 1}  # once per epoch, rank 0
    assert all(not b["skipped"] for b in batches[1:])
    seen = {i for b in batches for i in b["index"].tolist()}
    assert int(corrupt) not in seen and int(no_caption) not in seen
    assert len(batches) == (N_PACKED - 2) // 8
    # a second open reuses the verified index (cached by the tar's size and mtime)
    assert open_shards(packed_copy).read_skipped == shards.read_skipped


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_pretrain_run_on_medpix_shards(backend, packed, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["unimlip-fast", *map(str, run_args(packed, backend, run))])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    assert e.value.code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss/total" in m]
    assert [m["phase"] for m in steps] == ["warmup", "warmup", "simclr", "simclr"]
    assert "loss/simclr" in steps[-1] and all(torch.isfinite(torch.tensor(m["loss/total"])) for m in steps)
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_resume_skips_the_batches_already_seen(backend, packed):
    whole = [b["index"].tolist() for b in shard_loader(backend, packed, seed=1, epoch=0)]
    resumed = shard_loader(backend, packed, seed=1, epoch=0, skip_batches=2)
    assert len(resumed) == len(whole) - 2
    assert [b["index"].tolist() for b in resumed] == whole[2:]


# ------------------------------------------------------------------------------------ the pieces


def test_crop_boxes_match_the_views_boxes_on_equal_sizes():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ours = crop_boxes(torch.full((64,), 90.0), torch.full((64,), 120.0), (0.08, 1.0), generator=g1)
    ref = random_resized_crop_boxes(64, 90, 120, (0.08, 1.0), generator=g2)
    assert torch.allclose(ours, ref, atol=1.0)  # the same draws; at most a rounding step apart
    assert (ours[:, 0] + ours[:, 2] <= 120).all() and (ours[:, 1] + ours[:, 3] <= 90).all()


def test_mixed_sizes_never_sample_the_padding():
    # A white 40x30 image beside a black 80x100 one: every view of the white one stays white.
    images = [torch.ones(3, 40, 30), torch.zeros(3, 80, 100)]
    x, hs, ws = canvas(images)
    assert x.shape == (2, 3, 81, 101) and hs.tolist() == [40, 80] and ws.tolist() == [30, 100]
    views = make_views(
        x, hs, ws, 16, torch.Generator().manual_seed(0), strong=False, recipe=ViewRecipe(weak_scale=(0.08, 1.0))
    )["image"]
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(views[0], white.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_backend_choice():
    assert resolve_backend("auto", "cpu", None) == ("cpu", "auto: no CUDA device")
    assert resolve_backend("auto", "cpu", "shards")[0] == "torch"  # the backend that reads them
    with pytest.raises(
        DataError,
        match=r"^data.shards=shards is read by data.backend=torch, dali or auto; "
        r"data.backend=cpu reads the source files",
    ):
        resolve_backend("cpu", "cpu", "shards")
    assert resolve_backend("torch", "cpu", None)[0] == "torch"
    # auto on a CUDA device (only the device's type is read): DALI needs shards, else the torch path
    assert resolve_backend("auto", "cuda", None) == ("torch", "auto: CUDA, no packed shards (data.shards)")
    if dali_available():
        assert resolve_backend("auto", "cuda", "shards")[0] == "dali"
        with pytest.raises(DataError, match="data.shards"):
            resolve_backend("dali", "cpu", None)


def test_shards_from_another_tokenizer_are_refused(packed):
    class Dataset:
        input_ids = torch.zeros(N_PACKED, CONTEXT, dtype=torch.int32).numpy() + 7
        attention_mask = torch.ones(N_PACKED, CONTEXT, dtype=torch.uint8).numpy()

        def __len__(self):
            return N_PACKED

    with pytest.raises(DataError, match="tokenizer"):
        check_against_dataset(open_shards(packed), Dataset())


def test_torch_backend_on_records_without_shards(tiny_tokenizer):
    """Without shards the torch backend reads the trainer's dataset (phantom images here) and keeps
    the CPU loader's sample order; captions are the dataset's tokenised ids."""
    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.dataset import build_dataset
    from unimlip_fast.data.sources import read_records

    ds = build_dataset(
        read_records(DataConfig(format="phantom", phantom_size=64), "train"), tiny_tokenizer, IMAGE_SIZE, CONTEXT
    )
    gpu = epoch(train_loader("torch", ds, batch=8, seed=1, strong_views=True))
    cpu = epoch(train_loader("cpu", ds, batch=8, seed=1))
    assert [b["index"].tolist() for b in gpu] == [b["index"].tolist() for b in cpu]
    for batch in gpu:
        check_contract(batch, 8, strong=True, mlm=False)
        assert torch.equal(batch["input_ids"], torch.from_numpy(ds.input_ids[batch["index"].numpy()]).long())


def test_a_copied_shard_is_trusted_an_edited_one_verified(packed, tmp_path):
    import os

    copy = copy_packed(packed, tmp_path / "copy")
    tar = copy / "shard-000000.tar"
    os.utime(tar, ns=(1, 1))  # a copy without its mtime: same bytes
    shards = open_shards(copy)
    assert not shards.read_skipped and shards.indices[0] == copy / "shard-000000.idx"
    assert json.loads((copy / ".verified/shard-000000.json").read_text())["unchanged"]
    # The same size, one image's bytes overwritten in place: found by the digest, then verified.
    name = first_member_names(copy)[2]
    line = (copy / "shard-000000.idx").read_text().split("\n")[3].split()
    assert line[3] == f"{name}.jpg"
    with open(tar, "r+b") as fh:
        fh.seek(int(line[1]))
        fh.write(b"\x00" * 64)
    shards = open_shards(copy)
    assert dict(shards.read_skipped) == {"undecodable_image": 1} and len(shards) == N_PACKED - 1


def test_torch_jpeg_bytes_decoded_in_the_main_process(packed, monkeypatch):
    """The nvJPEG path (JPEG bytes from workers, one batched decode_jpeg call) with a stand-in for
    torchvision.io that decodes with PIL on the CPU and fails on one chosen image, as nvJPEG
    would: the batch keeps its size, the failure is counted, the other batches are the PIL path's."""
    import io
    import types

    import numpy as np
    from PIL import Image

    shards = open_shards(packed)
    bad = int(shards.samples["index"][5])
    bad_bytes = int(shards.samples["img_size"][5])  # the stand-in recognises the image by its length
    assert (shards.samples["img_size"] == bad_bytes).sum() == 1

    def decode_jpeg(data, mode=None, device="cpu"):
        if isinstance(data, list):
            return [decode_jpeg(t, mode, device) for t in data]
        if len(data) == bad_bytes:
            raise RuntimeError("nvjpeg: corrupt stream")
        im = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).to(device)

    fake = types.ModuleType("torchvision.io")
    fake.decode_jpeg, fake.ImageReadMode = decode_jpeg, types.SimpleNamespace(RGB="RGB")
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)

    def run(on_device):
        return epoch(TorchLoader(shards, LoaderSpec(16, IMAGE_SIZE, strong_views=True), jpeg_on_device=on_device))

    raw, pil = run(True), run(False)
    skipped = [b["skipped"] for b in raw]
    with_bad = [k for k, b in enumerate(raw) if bad in b["index"].tolist()]
    assert skipped[with_bad[0]] == {"undecodable_image": 1} and sum(map(bool, skipped)) == 1
    for k, (a, b) in enumerate(zip(raw, pil)):
        check_contract(a, 16, strong=True, mlm=False)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["input_ids"], b["input_ids"])
        if k not in with_bad:  # decoded the same way, shrunk on the device instead of by PIL: close
            assert (a["image"] - b["image"]).abs().mean() < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda(backend, packed, mlm_tables):
    batches = epoch(
        shard_loader(backend, packed, mlm=mlm_tables, strong_views=True, device="cuda", dtype=torch.bfloat16)
    )
    assert len(batches) == N_PACKED // B
    for batch in batches:
        check_contract(
            {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()},
            B,
            strong=True,
            mlm=True,
            dtype=torch.bfloat16,
        )
        assert all(v.is_cuda for v in batch.values() if torch.is_tensor(v))


def test_changed_shards_verified_in_parallel(packed, tmp_path):
    copy = copy_packed(packed, tmp_path / "copy")
    for k, name in enumerate(sorted(copy.glob("shard-*.tar"))):
        rewrite_shard(name, drop={f"{first_member_names(copy, k)[0]}.ids"})
    shards = open_shards(copy, workers=2)
    assert dict(shards.read_skipped) == {"missing_caption": 3} and len(shards) == N_PACKED - 3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_resumed_run_matches_uninterrupted(backend, packed, tmp_path, monkeypatch):
    """The trainer's exact resume (test_train.py) through a GPU backend: mid-epoch, SimCLR phase included."""

    def run(run_dir, *extra):
        args = [str(a) for a in run_args(packed, backend, run_dir)]
        k = args.index("--ds-config") + 1
        args[k] = args[k].replace("zero2.json", "zero2_fp32.json")
        monkeypatch.setattr(sys, "argv", ["unimlip-fast", *args, "train.max_steps=5", *extra])
        with pytest.raises(SystemExit) as e:
            main()
            raise SystemExit(0)
        assert e.value.code == 0
        return {
            m["step"]: m
            for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss/total" in m
        }

    whole = run(tmp_path / "whole")
    run(tmp_path / "parts", "train.stop_after_steps=3")
    parts = run(tmp_path / "parts", "--resume", "latest")
    for step in (4, 5):
        for key in ("loss/total", "loss/itc", "loss/simclr", "loss/mlm"):
            assert parts[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-6), (step, key)
