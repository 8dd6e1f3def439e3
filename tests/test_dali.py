"""What only the DALI backend needs checking: its colour ops are DALI's own (pipeline built with CPU
operators and ``device_id=None``, the same definition the GPU runs with "mixed" decoding). The checks
every backend shares run over both GPU backends in test_shards.py."""

import pytest
import torch

from unimlip_fast.data.dali import dali_available
from unimlip_fast.data.views import ViewRecipe

from .helpers import CAPTIONS, shard_loader, tiny_tokenizer_dir

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import (pip install '.[dali]')")


def test_dali_strong_views_follow_the_recipe(tmp_path):
    """On colourful images: about 20% of strong views are grey (p 0.2), weak views never are, and
    strong views stay within the normalised [0,1] range."""
    import json

    import numpy as np
    from PIL import Image

    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.pack import PackOptions, pack

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
    pack(
        data,
        out,
        str(tiny_tokenizer_dir(tmp_path)),
        options=PackOptions(shard_size=50, context_length=24, progress=False),
    )
    batches = list(shard_loader("dali", out, strong_views=True, seed=0))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    strong = torch.cat([torch.cat([b["image_a"], b["image_b"]]) for b in batches]) * std + mean
    weak = torch.cat([b["image"] for b in batches]) * std + mean
    is_grey = lambda x: (x.amax(1) - x.amin(1)).flatten(1).amax(1) < 2e-2
    assert 0.08 <= is_grey(strong).float().mean() <= 0.35  # 192 views, p 0.2
    assert not is_grey(weak).any()
    assert strong.min() >= -1e-3 and strong.max() <= 1 + 1e-3
    # The pipeline reads the spec's recipe: greyscale always on makes every strong view grey.
    always_grey = list(shard_loader("dali", out, strong_views=True, seed=0, views=ViewRecipe(p_grey=1.0)))
    assert all(is_grey(b[key] * std + mean).all() for b in always_grey for key in ("image_a", "image_b"))
