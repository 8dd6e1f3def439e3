"""The DALI backend on packed MedPix shards, its pipeline built with CPU operators and
``device_id=None`` (the same definition the GPU runs with "mixed" decoding): the same checks as the
torch backend's (test_shards.py)."""
import pytest
import torch

from unimlip_fast.data.dali import dali_available

from .test_shards import (check_bad_samples_inside_a_shard, check_contract_and_phases, check_determinism,
                          check_ids_unchanged, check_on_cuda, check_pretrain_run, check_ranks, copy_packed, loader,
                          mlm_tables, packed)

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import (pip install '.[dali]')")
__all__ = ["packed", "mlm_tables"]  # module fixtures shared with test_shards.py


def test_dali_contract_and_phases(packed, mlm_tables):
    check_contract_and_phases("dali", packed, mlm_tables)


def test_dali_same_seed_same_batches(packed):
    check_determinism("dali", packed)


def test_dali_two_ranks_disjoint_and_covering(packed):
    check_ranks("dali", packed)


def test_dali_ids_unchanged(packed):
    check_ids_unchanged("dali", packed)


def test_dali_bad_samples_inside_a_shard(packed, tmp_path):
    check_bad_samples_inside_a_shard("dali", copy_packed(packed, tmp_path / "copy"))


def test_dali_resume_skips_the_batches_already_seen(packed):
    whole = [b["index"].tolist() for b in loader("dali", packed, seed=1, epoch=0)]
    resumed = loader("dali", packed, seed=1, epoch=0, skip_batches=2)
    assert len(resumed) == len(whole) - 2
    assert [b["index"].tolist() for b in resumed] == whole[2:]


def test_dali_strong_views_follow_the_recipe(tmp_path):
    """On colourful images: about 20% of strong views are grey (p 0.2), weak views never are, and
    strong views stay within the normalised [0,1] range."""
    import json

    import numpy as np
    from PIL import Image

    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.pack import pack

    from .conftest import CAPTIONS
    from .shard_helpers import tiny_tokenizer_dir

    rng = np.random.default_rng(0)
    (tmp_path / "im").mkdir()
    rows = []
    for i in range(96):
        colour = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8).repeat(12, 0).repeat(12, 1)
        Image.fromarray(colour).save(tmp_path / "im" / f"{i}.jpg", quality=95)
        rows.append({"image": f"{i}.jpg", "caption": CAPTIONS[i % len(CAPTIONS)]})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = DataConfig(format="jsonl", path=str(tmp_path / "pairs.jsonl"), image_root=str(tmp_path / "im"), split="all")
    out = tmp_path / "packed"
    pack(data, out, str(tiny_tokenizer_dir(tmp_path)), shard_size=50, context_length=24, progress=False)
    batches = list(loader("dali", out, strong_views=True, seed=0))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    strong = torch.cat([torch.cat([b["image_a"], b["image_b"]]) for b in batches]) * std + mean
    weak = torch.cat([b["image"] for b in batches]) * std + mean
    is_grey = lambda x: (x.amax(1) - x.amin(1)).flatten(1).amax(1) < 2e-2  # noqa: E731
    assert 0.08 <= is_grey(strong).float().mean() <= 0.35  # 192 views, p 0.2
    assert not is_grey(weak).any()
    assert strong.min() >= -1e-3 and strong.max() <= 1 + 1e-3


def test_dali_pretrain_run_on_medpix_shards(packed, tmp_path, monkeypatch):
    check_pretrain_run("dali", packed, tmp_path, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (mixed decode)")
def test_dali_on_cuda(packed, mlm_tables):
    check_on_cuda("dali", packed, mlm_tables)
