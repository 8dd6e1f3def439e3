"""Retrieval examples from the evaluation split: images with their top captions, captions with their
top images, the true match marked.

The embeddings come from the retrieval evaluation's own code (:func:`build_eval_set`,
:func:`embed_pairs`), so the gallery shows exactly what the reported recalls measured.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..config import DataConfig
from ..data.decoding import decode_image
from ..eval.retrieval import build_eval_set, embed_pairs, positive_pairs, ranks_of_positives

TRUE_COLOUR = "#1a7f37"
THUMBNAIL_PX = 192


@dataclass
class Gallery:
    split: str
    n_pairs: int  # the evaluation set the queries were ranked against
    # {"index", "key", "caption", "rank", "top": [{"index", "key", "caption", "score", "true"}], "best_true": {...}}:
    # the top hits, and the best-ranked true match (shown too when it is not among the top hits)
    image_queries: list[dict[str, Any]]
    caption_queries: list[dict[str, Any]]  # the same shape, the hits being images
    thumbnails: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # by evaluation index

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_pairs": self.n_pairs,
            "image_queries": self.image_queries,
            "caption_queries": self.caption_queries,
        }


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)`` (all of them when ``n <= count``)."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(count, n))})


def build_gallery(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    data: DataConfig | None = None,
    split: str | None = None,
    n_images: int = 8,
    n_captions: int = 4,
    top_k: int = 5,
) -> Gallery:
    """Queries spread evenly over the run's evaluation split (``data``/``split`` override the run's)."""
    from ..loading import load

    trained = load(run_dir, device)
    model, tokenizer, cfg = trained.model, trained.tokenizer, trained.cfg
    split = split or cfg.eval.split
    if not split:
        raise ValueError("the run has no evaluation split (eval.split is empty); give one with --split")
    eval_set = build_eval_set(model, tokenizer, data or cfg.data, split)
    img, txt = embed_pairs(model, eval_set.dataset, torch.device(device), cfg.eval.batch_size)
    records = eval_set.dataset.records
    positives = positive_pairs([r.caption for r in records], eval_set.one_positive)
    sim = img @ txt.T
    top_k = min(top_k, len(records))

    def queries(similarity: torch.Tensor, indices: list[int]) -> list[dict[str, Any]]:
        ranks = ranks_of_positives(similarity, positives)

        def hit(q: int, j: int) -> dict[str, Any]:
            return {
                "index": j,
                "key": records[j].key,
                "caption": records[j].caption,
                "score": round(float(similarity[q, j]), 4),
                "true": bool(positives[q, j]),
            }

        out = []
        for q in indices:
            best_true = int(similarity[q].masked_fill(~positives[q], float("-inf")).argmax())
            out.append(
                {
                    "index": q,
                    "key": records[q].key,
                    "caption": records[q].caption,
                    "rank": int(ranks[q]),
                    "top": [hit(q, j) for j in similarity[q].topk(top_k).indices.tolist()],
                    "best_true": hit(q, best_true),
                }
            )
        return out

    image_queries = queries(sim, spread_indices(len(records), n_images))
    caption_queries = queries(sim.T, spread_indices(len(records), n_captions))
    shown = (
        {q["index"] for q in image_queries}
        | {t["index"] for q in caption_queries for t in q["top"]}
        | {q["best_true"]["index"] for q in caption_queries}
    )
    thumbnails = {i: _thumbnail(records[i].image) for i in sorted(shown)}
    return Gallery(split, len(records), image_queries, caption_queries, thumbnails)


def _thumbnail(image: str | np.ndarray) -> np.ndarray:
    return np.asarray(image) if isinstance(image, np.ndarray) else decode_image(image, THUMBNAIL_PX)


def _short(text: str, width: int, lines: int) -> str:
    return "\n".join(textwrap.wrap(" ".join(text.split()), width, max_lines=lines, placeholder=" ..."))


def _show(ax, image: np.ndarray, frame: str | None = None) -> None:
    ax.imshow(image, cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame:
            spine.set_color(frame)
            spine.set_linewidth(4)


def image_queries_figure(gallery: Gallery) -> Figure:
    """Each query image beside its top captions; the true caption in green with a check mark (below the
    list, with its rank, when it is not among them)."""
    rows = len(gallery.image_queries)
    fig = Figure(figsize=(13, 1.9 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, 2, width_ratios=[1, 8])
    for r, query in enumerate(gallery.image_queries):
        _show(fig.add_subplot(grid[r, 0]), gallery.thumbnails[query["index"]])
        ax = fig.add_subplot(grid[r, 1])
        ax.axis("off")
        ax.text(
            0,
            1,
            f"{query['key']}: its caption ranks {query['rank']} of {gallery.n_pairs}",
            fontsize=9,
            fontweight="bold",
            va="top",
            transform=ax.transAxes,
            parse_math=False,
        )
        lines = [(f"{n + 1}.", hit) for n, hit in enumerate(query["top"])]
        if not any(hit["true"] for hit in query["top"]):
            lines.append((f"{query['rank']}.", query["best_true"]))
        for n, (place, hit) in enumerate(lines):
            mark = "\u2713" if hit["true"] else " "
            ax.text(
                0,
                0.84 - n * 0.145,
                f"{mark} {place} ({hit['score']:.2f}) {_short(hit['caption'], 150, 1)}",
                fontsize=8,
                va="top",
                transform=ax.transAxes,
                parse_math=False,
                color=TRUE_COLOUR if hit["true"] else "black",
                fontweight="bold" if hit["true"] else "normal",
            )
    fig.suptitle(
        f"Image -> text on the {gallery.split} split: top {len(gallery.image_queries[0]['top'])} captions "
        f"(similarity); \u2713 the image's own caption",
        fontsize=11,
    )
    return fig


def caption_queries_figure(gallery: Gallery) -> Figure:
    """Each query caption above its top images; the true image framed in green (after them, with its rank,
    when it is not among them)."""
    rows = len(gallery.caption_queries)
    top_k = len(gallery.caption_queries[0]["top"])
    fig = Figure(figsize=(13, 3.0 * rows), layout="constrained")
    subfigs = fig.subfigures(rows, 1, hspace=0.04) if rows > 1 else [fig.subfigures(1, 1)]
    for subfig, query in zip(subfigs, gallery.caption_queries, strict=True):
        subfig.suptitle(
            f"{query['key']} (its image ranks {query['rank']} of {gallery.n_pairs}): "
            f"{_short(query['caption'], 140, 2)}",
            fontsize=9,
            x=0.01,
            ha="left",
        )
        panels = [(f"{n + 1}.", hit) for n, hit in enumerate(query["top"])]
        found = any(hit["true"] for hit in query["top"])
        panels.append(("", None) if found else (f"{query['rank']}.", query["best_true"]))
        for ax, (place, hit) in zip(subfig.subplots(1, top_k + 1), panels, strict=True):
            if hit is None:
                ax.axis("off")
                continue
            _show(ax, gallery.thumbnails[hit["index"]], TRUE_COLOUR if hit["true"] else None)
            ax.set_title(
                f"{place} ({hit['score']:.2f})" + (" \u2713 true image" if hit["true"] else ""),
                fontsize=8,
                color=TRUE_COLOUR if hit["true"] else "black",
            )
    fig.suptitle("Text -> image: top images (similarity); the caption's own image framed in green", fontsize=11)
    return fig
