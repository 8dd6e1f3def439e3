"""Two CPU ranks under DeepSpeed ZeRO-2 (gloo) give the loss and gradients of one process on the
concatenated batch: the contrastive terms really are global-batch losses."""

import os

import pytest
import torch

from unimlip_fast.config import load_config
from unimlip_fast.model import SIMCLR, build_model, build_tokenizer
from unimlip_fast.objective import compute_terms, total_loss

from .helpers import CAPTIONS, TINY_OVERRIDES, spawn_ranks

pytestmark = pytest.mark.slow

# Deterministic on every rank: no dropout, no DropBlock noise, no SimCLR head (its BatchNorm uses
# per-rank batch statistics, like SLIP's without SyncBatchNorm). The image encoder's BatchNorm is
# frozen (SimCLR phase), so per-rank and whole-batch normalisation agree.
OVERRIDES = TINY_OVERRIDES + [
    "model.dropblock_p=0.0",
    "model.text_dropout=0.0",
    "model.text.hidden_dropout=0.0",
    "loss.simclr=0.0",
    "train.batch_size=8",
    "train.grad_clip=0.0",
]
CHECKED = [
    "visual.conv1.weight",
    "visual.attnpool.c_proj.weight",
    "text_projection.weight",
    "text.encoder.embeddings.word_embeddings.weight",
    "fusion.head.weight",
    "logit_scale",
]


def make_everything():
    """The same model and batch in every process (the caption vocabulary is deterministic)."""
    cfg = load_config(None, OVERRIDES)
    tokenizer = build_tokenizer(cfg.model.text, CAPTIONS)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # give the BatchNorm running statistics realistic values before freezing them
        model.train().visual(torch.randn(32, 3, 64, 64, generator=g))
    tok = tokenizer(CAPTIONS[::6], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    labels = torch.full((8, 24), -100)
    labels[:, 3] = tok["input_ids"][:, 3]  # one masked token per caption: per-rank MLM means average exactly
    ids = tok["input_ids"].clone()
    ids[:, 3] = tokenizer.mask_token_id
    batch = {
        "image": torch.randn(8, 3, 64, 64, generator=g),
        "input_ids": ids,
        "attention_mask": tok["attention_mask"],
        "mlm_labels": labels,
    }
    return cfg, model, batch


def _rank_main(rank, world, out_dir, ds_json):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from unimlip_fast.train.distributed import init_distributed
    from unimlip_fast.train.ds_config import load_ds_config, resolve_ds_config
    from unimlip_fast.train.schedule import build_optimizer

    env = init_distributed()
    cfg, model, batch = make_everything()
    half = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
    ds = resolve_ds_config(load_ds_config(ds_json), cfg, world)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.train, env.device), config=ds, dist_init_required=False
    )
    engine.train()
    terms = compute_terms(engine(half, SIMCLR), cfg.loss, model.ops)
    loss = total_loss(terms, cfg.loss)
    engine.backward(loss)
    named = dict(engine.module.named_parameters())
    grads = {name: safe_get_full_grad(named[name]).clone() for name in CHECKED}
    losses = torch.stack([loss.detach()])
    torch.distributed.all_reduce(losses)
    if rank == 0:
        torch.save(
            {"loss": (losses / world).item(), "grads": grads, "terms": {k: v.item() for k, v in terms.items()}},
            os.path.join(out_dir, "ranks.pt"),
        )
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("ds_json", ["configs/zero2_fp32.json"])
def test_two_ranks_match_one_process(tmp_path, ds_json):
    spawn_ranks(_rank_main, 2, str(tmp_path), ds_json)
    ranks = torch.load(tmp_path / "ranks.pt")

    cfg, model, batch = make_everything()
    model.train()
    loss = total_loss(compute_terms(model(batch, SIMCLR), cfg.loss, model.ops), cfg.loss)
    loss.backward()
    named = dict(model.named_parameters())
    assert ranks["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert named["visual.conv1.weight"].grad.abs().sum() > 0, "vacuous: no gradient reached the image encoder"
    for name in CHECKED:
        torch.testing.assert_close(ranks["grads"][name], named[name].grad, rtol=1e-4, atol=1e-6, msg=name)
