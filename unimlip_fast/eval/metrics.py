"""Downstream metrics: ROC AUC per label and its macro average; VQA accuracy by answer type."""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (ascending), tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each run of equals
    counts = np.diff(np.r_[starts, len(values)])
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def roc_auc(scores, targets) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties counted as half.
    Needs both classes in ``targets`` (0/1)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(targets) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both a positive and a negative example")
    rank_sum = average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(scores, targets, labels: tuple[str, ...] | list[str]) -> dict:
    """``scores``, ``targets`` [N, L] (targets 1/0, NaN where the label is unknown) ->
    ``{"macro_auc", "per_label", "excluded"}``. A label whose known targets hold a single class has
    no AUC: it is left out of the macro average and listed in ``excluded``."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    per_label, excluded = {}, []
    for j, label in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        t = targets[known, j]
        if t.size == 0 or t.min() == t.max():
            excluded.append(label)
            continue
        per_label[label] = roc_auc(scores[known, j], t)
    macro = float(np.mean(list(per_label.values()))) if per_label else float("nan")
    return {"macro_auc": macro, "per_label": per_label, "excluded": excluded}


def vqa_accuracy(predicted: list[str], answers: list[str], answer_types: list[str]) -> dict:
    """Exact-match accuracy (answers already normalised) on open, closed and all questions."""
    correct = np.array([p == a for p, a in zip(predicted, answers, strict=True)], dtype=bool)
    types = np.array(answer_types)
    result = {}
    for name, mask in (("open", types == "OPEN"), ("closed", types == "CLOSED"), ("overall", np.ones_like(correct))):
        result[name] = float(correct[mask].mean()) if mask.any() else float("nan")
    return result
