"""Medical VQA as classification over the answers seen in training (the paper, after M3AE/METER).

The model: the pretrained image and text encoders; the question's encoded tokens followed by
``learnable_tokens`` learned vectors; image tokens (the attention-pooled embedding, then every
cell of the last feature map, projected to the text width, with learned positions); a randomly
initialised transformer (one layer) over text, learnable and image tokens, each with a type
embedding; a two-layer MLP head (Linear, LayerNorm, GELU, Linear, as M3AE's) on the fused [CLS]
token, the mean of the fused learnable tokens and the fused pooled-image token, concatenated.
Encoders train at ``lr_encoders``, everything else at ``lr_fusion`` (AdamW, warm-up, linear decay).

A test answer never seen in training cannot be predicted: it counts as wrong, and the number of
such questions is reported. There is no validation split in VQA-RAD: the last epoch is scored.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import tokenize_captions
from ..data.questions import QAItem
from ..data.records import DataError, ItemSet, describe_skips
from ..data.sources import read_qa
from ..eval.metrics import vqa_accuracy
from ..train.distributed import DistEnv
from .common import (
    ImageCache,
    RunLog,
    TensorFields,
    ViewDataset,
    chunks,
    epoch_batches,
    eval_indices,
    gather_rows,
    load_backbone,
    make_loader,
    require_checkpoint,
    resize_attention_pool,
    wrap_ddp,
)
from .config import VQAConfig


class VQAModel(nn.Module):
    """``backbone``'s image and text towers (a pretrained model's), fused with ``learnable_tokens``
    by ``layers`` transformer layers, and an answer classifier."""

    def __init__(
        self,
        backbone: nn.Module,
        n_answers: int,
        image_size: int,
        learnable_tokens: int = 20,
        layers: int = 1,
        heads: int = 0,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.visual, self.text = visual, text = backbone.visual, backbone.text
        width = text.width
        heads = heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"model.fusion_heads={heads} does not divide the text width {width}")
        self.image_proj = nn.Linear(visual.feature_dim, width)
        self.pooled_proj = nn.Linear(visual.attnpool.c_proj.out_features, width)
        self.image_positions = nn.Parameter(torch.randn((image_size // 32) ** 2 + 1, width) * 0.02)
        self.learnable = nn.Parameter(torch.randn(learnable_tokens, width) * 0.02)
        self.token_type = nn.Embedding(3, width)  # text, learnable, image
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.fusion = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(
            nn.Linear(3 * width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, n_answers)
        )

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.visual.parameters(), *self.text.parameters()]

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_states: torch.Tensor | None = None,
        feature_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_states`` / ``feature_map``: the question's token states / the image's last feature map
        computed beforehand (a frozen text tower / image trunk)."""
        b = image.shape[0]
        feature_map = self.visual.trunk(image) if feature_map is None else feature_map
        pooled = self.visual.attnpool(feature_map)
        cells = self.image_proj(feature_map.flatten(2).transpose(1, 2))  # [B, g*g, W]
        image_tokens = torch.cat([self.pooled_proj(pooled)[:, None], cells], 1) + self.image_positions
        states = self.text(input_ids, attention_mask)[0] if text_states is None else text_states  # [B, L, W]
        n_text, n_learn = states.shape[1], self.learnable.shape[0]
        tokens = torch.cat(
            [
                states + self.token_type.weight[0],
                self.learnable.expand(b, -1, -1) + self.token_type.weight[1],
                image_tokens.to(states.dtype) + self.token_type.weight[2],
            ],
            1,
        )
        padding = torch.cat(
            [attention_mask == 0, attention_mask.new_zeros(b, n_learn + image_tokens.shape[1], dtype=torch.bool)], 1
        )
        fused = self.norm(self.fusion(tokens, src_key_padding_mask=padding))
        summary = torch.cat([fused[:, 0], fused[:, n_text : n_text + n_learn].mean(1), fused[:, n_text + n_learn]], -1)
        return self.head(summary)


def answer_vocabulary(items: list[QAItem]) -> list[str]:
    """The training answers, most frequent first (ties alphabetical)."""
    counts = collections.Counter(it.answer for it in items)
    return sorted(counts, key=lambda a: (-counts[a], a))


def majority_baseline(train: list[QAItem], test: list[QAItem]) -> dict:
    """Predict, for every test question, the most frequent training answer of its answer type."""
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for it in train:
        by_type[it.answer_type][it.answer] += 1
    overall = answer_vocabulary(train)[0]
    majority = {kind: sorted(c, key=lambda a: (-c[a], a))[0] for kind, c in by_type.items()}
    predicted = [majority.get(it.answer_type, overall) for it in test]
    seen = {it.answer for it in train}
    return {
        **vqa_accuracy(predicted, [it.answer for it in test], [it.answer_type for it in test]),
        "n_test": len(test),
        "n_unseen_answers": sum(it.answer not in seen for it in test),
        "majority_answers": majority,
    }


@torch.no_grad()
def question_states(
    text: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """The frozen text tower's token states [N, L, W] for every question, once (eval mode; each chunk
    runs cut to its longest question, the padding positions stay zero)."""
    was_training = text.training
    text.eval()
    states = torch.zeros(*input_ids.shape, text.width)
    for s in range(0, len(input_ids), batch_size):
        mask = attention_mask[s : s + batch_size]
        longest = int(mask.sum(1).max())
        ids = input_ids[s : s + batch_size, :longest]
        states[s : s + batch_size, :longest] = text(ids.to(device), mask[:, :longest].to(device))[0].cpu()
    text.train(was_training)
    return states


@torch.no_grad()
def image_feature_maps(
    visual: nn.Module, cache: ImageCache, paths: list[str], device: torch.device, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """The frozen image trunk's last feature map of every image, once (eval view, eval mode)."""
    was_training = visual.training
    visual.eval()
    maps = {}
    for s in range(0, len(paths), batch_size):
        chunk = paths[s : s + batch_size]
        views = torch.stack([cache.view(p, False, (1.0, 1.0), None) for p in chunk]).to(device)
        maps.update(zip(chunk, visual.trunk(views).cpu(), strict=True))
    visual.train(was_training)
    return maps


@dataclass(frozen=True)
class Precomputed:
    """What frozen towers give once for every sample: the question states of ``text`` (None: the text
    tower trains) and the image feature maps (None: the image encoder trains), on ``device``."""

    text: nn.Module | None
    feature_maps: dict[str, torch.Tensor] | None
    device: torch.device


def _dataset(
    items: list[QAItem],
    tokenizer,
    vocab: dict[str, int],
    cfg: VQAConfig,
    train: bool,
    cache: ImageCache,
    precomputed: Precomputed,
) -> ViewDataset:
    ids, mask = tokenize_captions(tokenizer, [it.question for it in items], cfg.data.context_length)
    ids, mask = torch.as_tensor(ids).long(), torch.as_tensor(mask).long()
    frozen_text, feature_maps = precomputed.text, precomputed.feature_maps
    extra = {} if frozen_text is None else {"text_states": question_states(frozen_text, ids, mask, precomputed.device)}
    if feature_maps is not None:
        extra["feature_map"] = torch.stack([feature_maps[it.image] for it in items])
    fields = TensorFields(
        input_ids=ids, attention_mask=mask, answer=torch.tensor([vocab.get(it.answer, -1) for it in items]), **extra
    )
    ds = ViewDataset([it.image for it in items], cache, fields, train, cfg.data.train_scale, cfg.train.seed)
    ds.items = items
    return ds


def _without_failed(qa: ItemSet[QAItem], cache: ImageCache) -> list[QAItem]:
    for it in qa.items:
        if it.image in cache.failed:
            qa.skipped.note(cache.failed[it.image], it.image)
    return [it for it in qa.items if it.image not in cache.failed]


def _trim(batch: dict) -> dict:
    """Question columns cut to the longest question in the batch."""
    longest = int(batch["attention_mask"].sum(1).max())
    keys = ("input_ids", "attention_mask", "text_states")
    return {**batch, **{k: batch[k][:, :longest] for k in keys if k in batch}}


def _forward(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    states, maps = batch.get("text_states"), batch.get("feature_map")
    return model(
        batch["image"].to(device),
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        None if states is None else states.to(device),
        None if maps is None else maps.to(device),
    )


@torch.no_grad()
def predict(model: nn.Module, ds: ViewDataset, batch_size: int, env: DistEnv, num_workers: int) -> torch.Tensor:
    """The predicted answer index of every question in the split."""
    was_training = model.training
    model.eval()
    index, predicted = [], []
    for batch in make_loader(ds, chunks(eval_indices(len(ds), env.rank, env.world_size), batch_size), num_workers):
        batch = _trim(batch)
        logits = _forward(model, batch, env.device)
        predicted.append(logits.argmax(-1).cpu())
        index.append(batch["index"])
    model.train(was_training)
    local = (torch.cat(index), torch.cat(predicted)) if index else (torch.zeros(0, dtype=torch.long),) * 2
    return gather_rows(*local, len(ds))


def linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def finetune_vqa(
    cfg: VQAConfig,
    checkpoint: str | Path,
    run_dir: str | Path,
    env: DistEnv,
    json_out: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    t, seed = cfg.train, cfg.train.seed
    require_checkpoint(checkpoint, uni_mlip_towers=True)  # before minutes of reading data
    log = RunLog(Path(run_dir), env)
    log.save_config(cfg)
    say = echo if env.is_main else (lambda _msg: None)

    sets = {split: read_qa(cfg.data.format, cfg.data.path, split) for split in ("train", "test")}
    cache = ImageCache(
        sorted({it.image for qa in sets.values() for it in qa.items}), cfg.data.image_size, cfg.data.cache_images
    )
    train_items, test_items = (_without_failed(sets[s], cache) for s in ("train", "test"))
    if not train_items or not test_items:
        raise DataError(
            f"no questions left with a decodable image (skipped: train "
            f"{describe_skips(sets['train'].skipped)}; test {describe_skips(sets['test'].skipped)})"
        )
    answers = answer_vocabulary(train_items)
    vocab = {a: i for i, a in enumerate(answers)}
    n_unseen = sum(it.answer not in vocab for it in test_items)
    say(
        f"{cfg.data.format}: train {len(train_items)} / test {len(test_items)} questions, {len(answers)} answers; "
        f"{n_unseen} test answers never seen in training (counted wrong); skipped: train "
        f"{describe_skips(sets['train'].skipped) or 'none'}; test {describe_skips(sets['test'].skipped) or 'none'}"
    )

    loaded = load_backbone(checkpoint, t.init, seed, env.device)
    backbone, tokenizer, pre_cfg, model_info = loaded.model, loaded.tokenizer, loaded.cfg, loaded.describe()
    del loaded
    resize_attention_pool(backbone.visual, cfg.data.image_size)
    torch.manual_seed(seed)
    m = cfg.model
    model = VQAModel(
        backbone, len(answers), cfg.data.image_size, m.learnable_tokens, m.fusion_layers, m.fusion_heads, m.dropout
    ).to(env.device)
    del backbone
    frozen_text = model.text.requires_grad_(False) if t.freeze_text else None
    feature_maps = None
    if t.freeze_image:
        model.visual.requires_grad_(False)
        images = sorted({it.image for it in train_items + test_items})
        feature_maps = image_feature_maps(model.visual, cache, images, env.device)
    precomputed = Precomputed(frozen_text, feature_maps, env.device)
    datasets = {
        "train": _dataset(train_items, tokenizer, vocab, cfg, True, cache, precomputed),
        "test": _dataset(test_items, tokenizer, vocab, cfg, False, cache, precomputed),
    }
    ddp = wrap_ddp(model, env)
    encoder_ids = {id(p) for p in model.encoder_parameters()}
    groups = [
        {"params": [p for p in model.encoder_parameters() if p.requires_grad], "lr": t.lr_encoders},
        {"params": [p for p in model.parameters() if id(p) not in encoder_ids], "lr": t.lr_fusion},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    global_batch = min(t.batch_size, len(train_items))
    n_batches = len(epoch_batches(len(train_items), global_batch, 0, env.world_size, seed, 0))
    total = n_batches * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_schedule(step, total, int(t.warmup_ratio * total))
    )
    say(
        f"init {t.init} from {checkpoint} (pretrained at {pre_cfg.model.image_size} px, fine-tuned at "
        f"{cfg.data.image_size} px); {env.world_size} rank(s), global batch {global_batch}, {t.epochs} epochs, "
        f"AdamW lr {t.lr_encoders} (encoders) / {t.lr_fusion} (fusion, head)"
        f"{'; text tower frozen, question states computed once' if t.freeze_text else ''}"
        f"{'; image trunk frozen, feature maps computed once (eval view)' if t.freeze_image else ''}"
    )

    substituted = 0
    for epoch in range(t.epochs):
        datasets["train"].epoch = epoch
        losses = []
        for batch in make_loader(
            datasets["train"],
            epoch_batches(len(train_items), global_batch, env.rank, env.world_size, seed, epoch),
            cfg.data.num_workers,
        ):
            batch = _trim(batch)
            logits = _forward(ddp, batch, env.device)
            loss = F.cross_entropy(logits.float(), batch["answer"].to(env.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
            substituted += int(batch["substituted"].gt(0).sum())
        train_loss = float(torch.stack(losses).mean())  # one sync per epoch
        log.log({"epoch": epoch + 1, "train_loss": round(train_loss, 5)})
        say(f"epoch {epoch + 1}/{t.epochs}  loss {train_loss:.4f}")

    log.save_weights(model, log.run.weights)
    if env.is_main:
        log.run.answers.write_text("\n".join(answers) + "\n")
    per_rank = max(1, global_batch // env.world_size)
    predicted = predict(model, datasets["test"], per_rank * 2, env, cfg.data.num_workers)
    accuracy = vqa_accuracy(
        [answers[i] for i in predicted.tolist()],
        [it.answer for it in test_items],
        [it.answer_type for it in test_items],
    )
    results = {
        **accuracy,
        "n_test": len(test_items),
        "n_unseen_answers": n_unseen,
        "n_train": len(train_items),
        "n_answers": len(answers),
        "epochs": t.epochs,
        "skipped": {s: dict(sets[s].skipped) for s in sets},
        "substituted_train_images": substituted,
        "init": t.init,
        "seed": seed,
        "data": cfg.data.format,
        "checkpoint": str(checkpoint),
        "model": model_info,
    }
    return log.finish(results, json_out)
