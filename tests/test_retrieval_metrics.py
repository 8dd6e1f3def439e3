import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.data.records import Record
from unimlip_fast.eval.retrieval import dedupe_captions, ranks_of_positives, recall_metrics, retrieval_metrics


def test_perfect_and_reversed_rankings():
    emb = F.normalize(torch.randn(20, 8), dim=-1)
    captions = [f"caption {i}" for i in range(20)]
    perfect = retrieval_metrics(emb, emb, captions)
    assert perfect["i2t"]["R@1"] == 100.0 and perfect["t2i"]["median_rank"] == 1.0
    sim = -torch.eye(5)  # the correct item is always the least similar
    ranks = ranks_of_positives(sim, torch.eye(5, dtype=torch.bool))
    assert ranks.tolist() == [5] * 5
    m = recall_metrics(ranks)
    assert m["R@1"] == 0.0 and m["R@5"] == 100.0 and m["median_rank"] == 5.0


def test_known_ranks():
    ranks = torch.tensor([1, 2, 6, 11, 3])
    m = recall_metrics(ranks)
    assert (m["R@1"], m["R@5"], m["R@10"]) == (20.0, 60.0, 80.0)
    assert m["median_rank"] == 3.0 and m["mean_rank"] == 4.6


def test_duplicate_captions_count_as_correct_when_kept():
    img = torch.eye(3)
    txt = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # image 0 is closest to text 1
    same = ["a lesion", "a lesion", "other"]
    assert retrieval_metrics(img, txt, same)["i2t"]["R@1"] == 100.0
    assert retrieval_metrics(img, txt, ["x", "y", "other"])["i2t"]["R@1"] < 100.0


def test_dedupe_keeps_first_of_each_caption():
    records = [Record(str(i), c, "") for i, c in enumerate(["a  b", "a b", "c", "a b", "d"])]
    kept, dropped = dedupe_captions(records)
    assert [r.key for r in kept] == ["0", "2", "4"] and dropped == 2


def test_one_positive_per_query_ignores_caption_duplicates():
    img = torch.eye(3)
    txt = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # items 0 and 1 swapped
    captions = ["same", "same", "other"]
    assert retrieval_metrics(img, txt, captions)["i2t"]["R@1"] == 100.0  # any pair with the caption counts
    assert retrieval_metrics(img, txt, captions, one_positive=True)["i2t"]["R@1"] == pytest.approx(33.33)
