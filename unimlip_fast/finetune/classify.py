"""Chest X-ray classification fine-tuned from a pretraining run, or another published model's image tower
(``pmc-clip:PATH``, ``open_clip:SPEC``), in the paper's protocol.

The model is the pretrained image encoder (its pooled embedding) and one linear layer,
trained end to end with binary cross-entropy (labels left unknown by U-Ignore carry no loss) and
Adam; each epoch ends with the validation macro AUC, the best epoch's weights are kept
(``best.safetensors``) and scored on the test split; training stops after ``train.patience`` epochs
without improvement or at ``train.epochs``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.labelled import LabelledImage, LabelOptions, draw_fraction, label_rates
from ..data.records import DataError, ItemSet, Skips, describe_skips
from ..data.sources import read_labelled
from ..data.views import CLIP_MEAN, CLIP_STD
from ..eval.metrics import macro_auc
from ..train.distributed import DistEnv
from .common import (
    ImageCache,
    RunLog,
    TensorFields,
    ViewDataset,
    chunks,
    epoch_batches,
    eval_indices,
    fit_image_size,
    gather_rows,
    load_backbone,
    make_loader,
    require_checkpoint,
    wrap_ddp,
)
from .config import ClassifyConfig

SPLITS = ("train", "valid", "test")  # as the results name them


class ImageClassifier(nn.Module):
    """Image encoder -> embedding -> one linear layer -> one logit per label."""

    def __init__(self, visual: nn.Module, embed_dim: int, n_labels: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, n_labels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(image))


def check_normalisation(backbone, checkpoint) -> None:
    """Fine-tuning's views normalise with CLIP's mean and std: a model trained with others is refused."""
    theirs = getattr(backbone, "normalisation", None)
    if theirs is not None and not (np.allclose(theirs[0], CLIP_MEAN) and np.allclose(theirs[1], CLIP_STD)):
        raise ValueError(
            f"{checkpoint}: its images are normalised with mean {list(theirs[0])} and std "
            f"{list(theirs[1])}; fine-tuning normalises with CLIP's {list(CLIP_MEAN)}, {list(CLIP_STD)}"
        )


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known (non-NaN) targets; none known gives 0 (with grad). No host
    sync: the unknown targets are weighted out, not selected."""
    known = ~torch.isnan(target)
    per_target = F.binary_cross_entropy_with_logits(logits, target.nan_to_num(0.0), reduction="none")
    return (per_target * known).sum() / known.sum().clamp_min(1)


def _decodable(items: list[LabelledImage], cache: ImageCache, skipped: Skips) -> list[LabelledImage]:
    kept = [it for it in items if it.path not in cache.failed]
    for it in items:
        if it.path in cache.failed:
            skipped.note(cache.failed[it.path], it.path)
    return kept


def _dataset(items: list[LabelledImage], cfg: ClassifyConfig, train: bool, seed: int) -> ViewDataset:
    cache = ImageCache([it.path for it in items], cfg.data.image_size, cfg.data.cache_images)
    targets = torch.tensor([it.target for it in items], dtype=torch.float32)
    ds = ViewDataset([it.path for it in items], cache, TensorFields(target=targets), train, cfg.data.train_scale, seed)
    ds.items, ds.targets = items, targets
    return ds


def _clean(ds: ViewDataset, skipped: Skips, cfg, train: bool, seed: int, split: str) -> ViewDataset:
    """Drop the images the cache could not decode (counted) and rebuild without them."""
    if not ds.cache.failed:
        return ds
    kept = _decodable(ds.items, ds.cache, skipped)
    if not kept:
        raise DataError(f"no decodable {split} images left (skipped: {describe_skips(skipped)})")
    return _dataset(kept, cfg, train, seed)


@torch.no_grad()
def predict(model: nn.Module, ds: ViewDataset, batch_size: int, env: DistEnv, num_workers: int) -> torch.Tensor:
    """Sigmoid scores [N, L] for the whole split, each rank scoring its share."""
    was_training = model.training
    model.eval()
    index, scores = [], []
    for batch in make_loader(ds, chunks(eval_indices(len(ds), env.rank, env.world_size), batch_size), num_workers):
        scores.append(torch.sigmoid(model(batch["image"].to(env.device)).float()).cpu())
        index.append(batch["index"])
    model.train(was_training)
    if not index:  # more ranks than samples
        return gather_rows(torch.zeros(0, dtype=torch.long), torch.zeros(0, ds.targets.shape[1]), len(ds))
    return gather_rows(torch.cat(index), torch.cat(scores), len(ds))


def read_splits(cfg: ClassifyConfig) -> dict[str, ItemSet[LabelledImage]]:
    d = cfg.data
    options = LabelOptions(d.uncertainty, d.frontal_only, d.val_fraction, d.split_seed)
    return {split: read_labelled(d.format, d.path, split, options) for split in SPLITS}


def finetune_classify(
    cfg: ClassifyConfig,
    checkpoint: str | Path,
    run_dir: str | Path,
    env: DistEnv,
    json_out: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    t, seed = cfg.train, cfg.train.seed
    require_checkpoint(checkpoint)  # before minutes of reading data
    log = RunLog(Path(run_dir), env)
    log.save_config(cfg)
    say = echo if env.is_main else (lambda _msg: None)

    splits = read_splits(cfg)
    labels = splits["train"].labels
    skipped = {s: _copy(v.skipped) for s, v in splits.items()}
    train_items = draw_fraction(splits["train"].items, cfg.data.fraction, seed)
    datasets = {
        "train": _dataset(train_items, cfg, True, seed),
        "valid": _dataset(splits["valid"].items, cfg, False, seed),
        "test": _dataset(splits["test"].items, cfg, False, seed),
    }
    datasets = {s: _clean(ds, skipped[s], cfg, s == "train", seed, s) for s, ds in datasets.items()}
    val_check = macro_auc(np.zeros(datasets["valid"].targets.shape), datasets["valid"].targets.numpy(), labels)
    if not val_check["per_label"]:
        raise DataError("no label has both classes in the validation split: early stopping has nothing to measure")
    n_train = len(datasets["train"])
    say(
        f"{cfg.data.format}: train {n_train} images ({n_train / len(splits['train']):.1%} of "
        f"{len(splits['train'])}, fraction {cfg.data.fraction}, seed {seed}), valid {len(datasets['valid'])}, "
        f"test {len(datasets['test'])}; skipped: {_skip_text(skipped)}"
    )

    backbone = load_backbone(checkpoint, t.init, seed, env.device)
    check_normalisation(backbone, checkpoint)
    visual = backbone.model.visual
    fit_image_size(visual, cfg.data.image_size, checkpoint)
    torch.manual_seed(seed)
    model = ImageClassifier(visual, backbone.embed_dim, len(labels)).to(env.device)
    model_info, pretrained_size = backbone.describe(), backbone.image_size
    del backbone
    ddp = wrap_ddp(model, env)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    global_batch = min(t.batch_size, n_train)
    per_rank = max(1, global_batch // env.world_size)
    if global_batch < t.batch_size:
        say(f"train.batch_size {t.batch_size} > {n_train} training images: batch {global_batch}")
    say(
        f"init {t.init} from {checkpoint} (pretrained at {pretrained_size} px, fine-tuned at "
        f"{cfg.data.image_size} px); {env.world_size} rank(s), global batch {global_batch}, Adam lr {t.lr}"
    )

    best, best_epoch, best_state, substituted = -math.inf, -1, None, 0
    for epoch in range(t.epochs):
        datasets["train"].epoch = epoch
        batches = epoch_batches(n_train, global_batch, env.rank, env.world_size, seed, epoch)
        losses = []
        for batch in make_loader(datasets["train"], batches, cfg.data.num_workers):
            logits = ddp(batch["image"].to(env.device))
            loss = masked_bce(logits.float(), batch["target"].to(env.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            substituted += int(batch["substituted"].gt(0).sum())
        scores = predict(model, datasets["valid"], per_rank * 2, env, cfg.data.num_workers)
        val = macro_auc(scores.numpy(), datasets["valid"].targets.numpy(), labels)["macro_auc"]
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")  # one sync per epoch
        log.log({"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_macro_auc": round(val, 5)})
        improved = val > best
        say(f"epoch {epoch + 1}/{t.epochs}  loss {train_loss:.4f}  val macro AUC {val:.4f}{'  *' if improved else ''}")
        if improved:
            best, best_epoch, best_state = val, epoch + 1, copy.deepcopy(model.state_dict())
            log.save_weights(model, log.run.best_weights)
        elif epoch + 1 - best_epoch >= t.patience:
            say(f"no better validation macro AUC for {t.patience} epochs: stopping")
            break

    model.load_state_dict(best_state)
    scores = predict(model, datasets["test"], per_rank * 2, env, cfg.data.num_workers)
    test = macro_auc(scores.numpy(), datasets["test"].targets.numpy(), labels)
    results = {
        "macro_auc": test["macro_auc"],
        "per_label": test["per_label"],
        "n_train": n_train,
        "n_test": len(datasets["test"]),
        "fraction": cfg.data.fraction,
        "fraction_drawn": round(n_train / len(splits["train"]), 4),
        "excluded_labels": test["excluded"],
        "val_macro_auc": best,
        "best_epoch": best_epoch,
        "epochs_run": epoch + 1,
        "train_label_rates": label_rates(datasets["train"].items, labels),
        "skipped": {s: dict(c) for s, c in skipped.items()},
        "substituted_train_images": substituted,
        "init": t.init,
        "seed": seed,
        "data": cfg.data.format,
        "checkpoint": str(checkpoint),
        "model": model_info,
    }
    return log.finish(results, json_out)


def _copy(skipped: Skips) -> Skips:
    copy = Skips()
    copy.add(skipped)
    return copy


def _skip_text(skipped: dict[str, Skips]) -> str:
    return "; ".join(f"{split} {describe_skips(c)}" for split, c in skipped.items() if describe_skips(c)) or "none"
