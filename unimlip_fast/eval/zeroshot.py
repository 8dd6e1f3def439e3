"""Zero-shot multi-label classification with prompt ensembles (CheXzero's positive-vs-negative
prompts): no labels are used to fit anything.

For each label, a set of positive prompts ("chest x-ray showing effusion") and of negative prompts
("no effusion") are embedded; each set's embeddings are averaged and renormalised (the ensemble).
An image's score for the label is the softmax probability of the positive against the negative
ensemble at the model's logit scale. Scores go through the same macro AUC as fine-tuned
classification, in the same JSON shape (``macro_auc``, ``per_label``, ``n_test``, ...).

Chance is an AUC of 0.5 for every label; with few positives a label's AUC scatters widely around
it, so the result also gives the 5th and 95th percentiles of the macro AUC over random rankings of
the same test set (``chance_macro_auc_p05``, ``chance_macro_auc_p95``): a macro AUC between them is
not distinguishable from chance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.labelled import LabelledImage
from ..data.records import DataError, ItemSet
from ..data.sources import LABELLED_SOURCES
from ..embed import embed_images
from ..inference import EmbeddingModel
from .metrics import macro_auc

ZEROSHOT_FORMATS: tuple[str, ...] = tuple(LABELLED_SOURCES)  # the chest X-ray releases and a label CSV

POSITIVE_TEMPLATES = ("{}", "chest x-ray showing {}", "findings consistent with {}", "there is {}")
NEGATIVE_TEMPLATES = ("no {}", "chest x-ray with no {}", "no evidence of {}", "there is no {}")
# Labels whose name does not read as a finding in a sentence.
FINDING_WORDS = {
    "Effusion": "pleural effusion",
    "Pleural_Thickening": "pleural thickening",
    "Lung Lesion": "lung lesion",
    "Pleural Other": "pleural abnormality",
    "Support Devices": "support devices",
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
}
NO_FINDING = "No Finding"
NO_FINDING_PROMPTS = (
    ["no acute cardiopulmonary process", "normal chest x-ray", "no abnormality"],
    ["abnormal chest x-ray", "acute cardiopulmonary process", "there is an abnormality"],
)


def default_prompts(labels: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """``{label: {"positive": [...], "negative": [...]}}`` from the templates."""
    prompts = {}
    for label in labels:
        if label == NO_FINDING:
            positive, negative = NO_FINDING_PROMPTS
        else:
            finding = FINDING_WORDS.get(label, label.replace("_", " ").lower())
            positive = [t.format(finding) for t in POSITIVE_TEMPLATES]
            negative = [t.format(finding) for t in NEGATIVE_TEMPLATES]
        prompts[label] = {"positive": list(positive), "negative": list(negative)}
    return prompts


def read_prompts(path: str | Path, labels: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """A prompts JSON: ``{"templates": {"positive": ["{} ..."], "negative": [...]}}`` for every label
    and/or ``{"labels": {label: {"positive": [...], "negative": [...]}}}`` for some; the rest default."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the prompts file {path}: {e}") from e
    prompts = default_prompts(labels)
    templates = spec.get("templates")
    if templates:
        for label in labels:
            finding = FINDING_WORDS.get(label, label.replace("_", " ").lower())
            prompts[label] = {side: [t.format(finding) for t in templates[side]] for side in ("positive", "negative")}
    unknown = sorted(set(spec.get("labels", {})) - set(labels))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not in the data set's labels {list(labels)}")
    for label, sides in spec.get("labels", {}).items():
        prompts[label] = {side: list(sides[side]) for side in ("positive", "negative")}
    for label, sides in prompts.items():
        if not sides["positive"] or not sides["negative"]:
            raise DataError(f"{path}: label {label!r} needs at least one positive and one negative prompt")
    return prompts


@torch.no_grad()
def prompt_ensembles(
    model: EmbeddingModel, prompts: dict[str, dict[str, list[str]]], labels: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive [L,D], negative [L,D])``: each label's prompts embedded, averaged, renormalised."""

    def ensemble(texts: list[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(texts).mean(dim=0), dim=-1)

    positive = torch.stack([ensemble(prompts[label]["positive"]) for label in labels])
    negative = torch.stack([ensemble(prompts[label]["negative"]) for label in labels])
    return positive, negative


def zeroshot_scores(
    images: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """``[N,D]`` image embeddings -> ``[N,L]`` probability of each label's positive ensemble
    against its negative one."""
    logits = torch.stack([images @ positive.T, images @ negative.T], dim=-1) * logit_scale
    return logits.softmax(dim=-1)[..., 0]


def chance_macro_auc(targets: np.ndarray, labels: tuple[str, ...], n_draws: int = 1000, seed: int = 0) -> dict:
    """Macro AUC of random scores on these targets: its mean, 5th and 95th percentiles over draws."""
    rng = np.random.default_rng(seed)
    draws = [macro_auc(rng.random(targets.shape), targets, labels)["macro_auc"] for _ in range(n_draws)]
    return {
        "mean": float(np.mean(draws)),
        "p05": float(np.percentile(draws, 5)),
        "p95": float(np.percentile(draws, 95)),
    }


def evaluate_zeroshot(
    model: EmbeddingModel,
    data: ItemSet[LabelledImage],
    prompts: dict[str, dict[str, list[str]]] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    chance_draws: int = 1000,
) -> dict[str, Any]:
    labels = data.labels
    prompts = prompts or default_prompts(labels)
    kept, image_rows, skipped = embed_images(model, [it.path for it in data.items], batch_size, workers)
    if not kept:
        raise DataError(f"no image of {data.source} could be read ({skipped})")
    targets = np.array([data.items[i].target for i in kept], dtype=np.float64)
    positive, negative = prompt_ensembles(model, prompts, labels)
    scale = model.logit_scale
    scores = zeroshot_scores(torch.from_numpy(image_rows), positive, negative, scale).numpy()
    result = macro_auc(scores, targets, labels)
    chance = chance_macro_auc(targets, labels, chance_draws) if chance_draws else {}
    positives = {label: int(np.nansum(targets[:, j])) for j, label in enumerate(labels)}
    return {
        "macro_auc": result["macro_auc"],
        "per_label": result["per_label"],
        "n_test": len(kept),
        "excluded_labels": result["excluded"],
        "n_positive": positives,
        "chance_macro_auc": 0.5,
        "chance_macro_auc_mean": chance.get("mean"),
        "chance_macro_auc_p05": chance.get("p05"),
        "chance_macro_auc_p95": chance.get("p95"),
        "skipped": {**dict(data.skipped), **skipped},
        "source": data.source,
        "logit_scale": scale,
        "prompts": prompts,
        "method": "zero-shot, positive vs negative prompt ensembles",
        "model": model.describe(),
    }
