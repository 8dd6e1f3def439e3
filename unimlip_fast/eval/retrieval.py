"""Image-text retrieval: Recall@1/5/10, mean and median rank, both directions.

Identical captions make a query ambiguous (MedPix repeats a case's caption over its images), so by
default the evaluation set keeps the first pair of each distinct caption and reports how many it
dropped. With duplicates kept, every item sharing the query's caption counts as a correct answer.
ROCO's published 2,000-pair test set (``roco_protocol``) is taken as it is: no de-duplication, and
each query has exactly one positive, its own pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..data.cpu_loader import build_eval_loader
from ..data.dataset import CaptionImageDataset, build_dataset
from ..data.formats import roco_eval_subset
from ..data.records import DataError, Record
from ..data.sources import read_records
from ..data.spec import trim_padding


def dedupe_captions(records: list[Record]) -> tuple[list[Record], int]:
    """The first pair of each distinct caption (whitespace-normalised), and how many were dropped."""
    seen, kept = set(), []
    for record in records:
        key = " ".join(record.caption.split())
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def ranks_of_positives(sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """[Q, N] similarities, [Q, N] bool positives -> 1-based rank of each query's best positive."""
    best_positive = sim.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((sim > best_positive) & ~positives).sum(dim=1)


def recall_metrics(ranks: torch.Tensor) -> dict[str, float]:
    ranks = ranks.double()
    metrics = {f"R@{k}": round(100.0 * (ranks <= k).double().mean().item(), 2) for k in (1, 5, 10)}
    metrics["median_rank"] = float(ranks.median().item())
    metrics["mean_rank"] = round(ranks.mean().item(), 2)
    return metrics


@torch.no_grad()
def embed_pairs(model, dataset, device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and caption embeddings, in dataset order, unmasked captions."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    for batch in build_eval_loader(dataset, batch_size):
        batch = trim_padding(batch)
        images.append(F.normalize(model.encode_image(batch["image"].to(device)).float(), dim=-1).cpu())
        texts.append(
            F.normalize(
                model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float(), dim=-1
            ).cpu()
        )
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def positive_pairs(captions: list[str], one_positive: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """[N, N] bool on ``device``, the correct answers: every pair with the query's caption (whitespace-normalised),
    or (``one_positive``) its own pair only."""
    if one_positive:
        group = torch.arange(len(captions), device=device)
    else:
        ids = {c: i for i, c in enumerate(dict.fromkeys(" ".join(c.split()) for c in captions))}
        group = torch.tensor([ids[" ".join(c.split())] for c in captions], device=device)
    return group[:, None] == group[None, :]


def retrieval_metrics(
    img: torch.Tensor, txt: torch.Tensor, captions: list[str], one_positive: bool = False, keys: list[str] | None = None
) -> dict[str, Any]:
    """Every pair with the query's caption counts as correct, or (``one_positive``) its own pair only.
    With ``keys`` (one per pair), ``per_query`` holds each query's rank both ways, so paired
    comparisons between models can be recomputed from the results."""
    positives = positive_pairs(captions, one_positive, img.device)
    sim = img @ txt.T
    ranks = {"i2t": ranks_of_positives(sim, positives), "t2i": ranks_of_positives(sim.T, positives.T)}
    results: dict[str, Any] = {"n": len(captions), **{d: recall_metrics(r) for d, r in ranks.items()}}
    if keys is not None:
        results["per_query"] = {"keys": list(keys), **{d: r.tolist() for d, r in ranks.items()}}
    return results


@dataclass(frozen=True)
class RetrievalProtocol:
    """Which pairs are scored, and what the results keep."""

    keep_duplicates: bool = False  # every pair, repeated captions included (each counts as a correct answer)
    roco_2000: bool = False  # ROCO's published 2,000 test pairs, as they are: one positive each
    per_query: bool = False  # each query's rank and key in the results


@dataclass
class EvalSet:
    """The pairs a retrieval evaluation embeds, and what was left out on the way."""

    dataset: CaptionImageDataset  # its ``records`` in evaluation order
    n_duplicates_dropped: int
    skipped_records: dict[str, int]
    one_positive: bool  # each query's own pair is its only correct answer (ROCO's protocol)


def select_pairs(data: DataConfig, split: str, protocol: RetrievalProtocol) -> tuple[list[Record], int, dict]:
    """The pairs the protocol scores, how many repeated captions it dropped, the records skipped reading."""
    if protocol.roco_2000:  # the published 2,000 test pairs, as they are: one positive each, no de-duplication
        if data.format != "roco":
            raise ValueError(f"the ROCO 2,000-pair protocol needs ROCO data, got format {data.format!r}")
        record_set = roco_eval_subset(data.path)
    else:
        record_set = read_records(data, split)
    records = list(record_set.items)
    n_dropped = 0
    if not protocol.keep_duplicates and not protocol.roco_2000:
        records, n_dropped = dedupe_captions(records)
    return records, n_dropped, dict(record_set.skipped)


def build_eval_set(
    model, tokenizer, data: DataConfig, split: str, protocol: RetrievalProtocol | None = None
) -> EvalSet:
    protocol = protocol or RetrievalProtocol()
    records, n_dropped, skipped = select_pairs(data, split, protocol)
    dataset = build_dataset(records, tokenizer, model.cfg.image_size, model.cfg.text.context_length)
    return EvalSet(dataset, n_dropped, skipped, one_positive=protocol.roco_2000)


def evaluate_retrieval(
    model,
    tokenizer,
    data: DataConfig,
    split: str,
    device: torch.device,
    batch_size: int = 128,
    protocol: RetrievalProtocol | None = None,
) -> dict[str, Any]:
    """R@1/5/10 and ranks both ways on ``split`` of ``data``, embedded with ``model`` and ``tokenizer``."""
    protocol = protocol or RetrievalProtocol()
    eval_set = build_eval_set(model, tokenizer, data, split, protocol)
    img, txt = embed_pairs(model, eval_set.dataset, device, batch_size)
    keys = [r.key for r in eval_set.dataset.records] if protocol.per_query else None
    results = retrieval_metrics(img, txt, eval_set.dataset.captions, one_positive=eval_set.one_positive, keys=keys)
    results["n_duplicates_dropped"] = eval_set.n_duplicates_dropped
    results["skipped_records"] = eval_set.skipped_records
    results["split"] = "test (ROCO 2,000-pair protocol)" if protocol.roco_2000 else split
    return results


def evaluate_loaded_retrieval(
    model, data: DataConfig, split: str, batch_size: int = 128, protocol: RetrievalProtocol | None = None
) -> dict[str, Any]:
    """Retrieval with a loaded model (:func:`unimlip_fast.load`): a run of this project (or its export)
    through :func:`evaluate_retrieval`, exactly as its training ended; any other model (``pmc-clip:``,
    ``open_clip:``) with its own preprocessing and tokenizer on the same pairs, an image that does not
    load dropping its pair, counted. The results name the model (spec and weights digest)."""
    from ..embed import embed_images

    protocol = protocol or RetrievalProtocol()
    if model.native:
        results = evaluate_retrieval(model.model, model.tokenizer, data, split, model.device, batch_size, protocol)
        return {**results, "model": model.describe()}
    records, n_dropped, skipped = select_pairs(data, split, protocol)
    kept, image_rows, failed = embed_images(model, [r.image for r in records], batch_size)
    records = [records[i] for i in kept]
    if not records:
        raise DataError(f"no image of the {split} split could be read ({failed})")
    captions = [r.caption for r in records]
    txt = model.encode_text(captions, batch_size=max(batch_size, 64))
    keys = [r.key for r in records] if protocol.per_query else None
    results = retrieval_metrics(torch.from_numpy(image_rows), txt, captions, one_positive=protocol.roco_2000, keys=keys)
    results["n_duplicates_dropped"] = n_dropped
    results["skipped_records"] = {**skipped, **{k: skipped.get(k, 0) + v for k, v in failed.items()}}
    results["split"] = "test (ROCO 2,000-pair protocol)" if protocol.roco_2000 else split
    return {**results, "model": model.describe()}
