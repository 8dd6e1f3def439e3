"""Whole-word MLM masking: statistics, whole words, specials untouched, labels right."""

from __future__ import annotations

import pytest
import torch

from unimlip_fast.data.masking import MaskingTables, mask_tokens, mlm_row_cap

from .helpers import wordpiece_tokenizer

CAPTIONS = [
    "mri of the head showing two small lesions in the upper left.",
    "abdomen ct: one large lesion, lower right",
    "x-ray of the chestal abdomens showings",
    "",
]


@pytest.fixture
def tok(tmp_path):
    return wordpiece_tokenizer(tmp_path)


def _batch(tok, captions, length=24):
    enc = tok(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _words(tok, ids_row, mask_row):
    """Word spans (lists of positions) of one row, computed the slow, obvious way."""
    spans = []
    for pos, (i, m) in enumerate(zip(ids_row.tolist(), mask_row.tolist())):
        if not m or i in tok.all_special_ids:
            continue
        token = tok.convert_ids_to_tokens(i)
        if token.startswith("##") and spans and spans[-1][-1] == pos - 1:
            spans[-1].append(pos)
        else:
            spans.append([pos])
    return spans


def test_tables_from_a_wordpiece_tokenizer(tok):
    t = MaskingTables.from_tokenizer(tok)
    assert t.vocab_size == len(tok) and t.mask_id == tok.mask_token_id
    for token in ("##s", "##men"):
        assert not t.word_start[tok.convert_tokens_to_ids(token)]
    assert t.word_start[tok.convert_tokens_to_ids("ab")] and t.word_start[tok.convert_tokens_to_ids("lesion")]
    assert set(torch.nonzero(t.special).squeeze(1).tolist()) == set(tok.all_special_ids)
    assert not t.special[t.random_ids].any() and len(t.random_ids) == len(tok) - len(tok.all_special_ids)


def test_whole_words_specials_and_labels(tok):
    tables = MaskingTables.from_tokenizer(tok)
    ids, attn = _batch(tok, CAPTIONS * 50)
    out, labels = mask_tokens(ids, attn, tables, 0.3, torch.Generator().manual_seed(0))
    assert out.shape == ids.shape and out.dtype == ids.dtype and labels.dtype == torch.int64
    chosen = labels != -100
    # Labels hold the original ids where chosen; unchosen positions are unchanged.
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])
    # Specials and padding are never chosen.
    special = torch.isin(ids, torch.tensor(tok.all_special_ids)) | (attn == 0)
    assert not chosen[special].any()
    # Whole words: every word is chosen entirely or not at all.
    for b in range(ids.shape[0]):
        for span in _words(tok, ids[b], attn[b]):
            flags = chosen[b, span]
            assert flags.all() or not flags.any(), (b, span)
    # At least one word in each non-empty caption; none in the empty one.
    nonempty = torch.tensor([bool(c) for c in CAPTIONS * 50])
    assert chosen[nonempty].any(dim=1).all() and not chosen[~nonempty].any()


def test_rates_15_percent_and_80_10_10(tok):
    tables = MaskingTables.from_tokenizer(tok)
    ids, attn = _batch(tok, CAPTIONS[:3] * 2000)
    out, labels = mask_tokens(ids, attn, tables, 0.15, torch.Generator().manual_seed(1), min_one=False)
    chosen = labels != -100
    word_tokens = (attn.bool() & ~tables.special[ids]).sum().item()
    assert abs(chosen.sum().item() / word_tokens - 0.15) < 0.01
    # Word-level rate: the fraction of word starts chosen.
    starts = attn.bool() & ~tables.special[ids] & tables.word_start[ids]
    assert abs((chosen & starts).sum().item() / starts.sum().item() - 0.15) < 0.01
    n = chosen.sum().item()
    to_mask = (out == tables.mask_id) & chosen
    kept = (out == ids) & chosen
    replaced = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    # A random replacement can draw the original token (1 in |random_ids|): it then counts as kept.
    assert abs(kept.sum().item() / n - 0.1 - 0.1 / len(tables.random_ids)) < 0.015
    assert abs(replaced.sum().item() / n - 0.1 * (1 - 1 / len(tables.random_ids))) < 0.015
    assert not tables.special[out[replaced]].any()


def test_min_one_chooses_a_word_in_every_caption(tok):
    tables = MaskingTables.from_tokenizer(tok)
    ids, attn = _batch(tok, ["ct"] * 1000)
    _, labels = mask_tokens(ids, attn, tables, 0.15, torch.Generator().manual_seed(2))
    assert (labels != -100).sum(dim=1).eq(1).all()  # one word, always chosen


def test_deterministic_with_a_generator_and_truncation_safe(tok):
    tables = MaskingTables.from_tokenizer(tok)
    ids, attn = _batch(tok, CAPTIONS * 4, length=6)  # truncation can cut inside a word
    a = mask_tokens(ids, attn, tables, 0.5, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, attn, tables, 0.5, torch.Generator().manual_seed(5))
    c = mask_tokens(ids, attn, tables, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # A continuation right after [CLS] (a word cut by truncation from the left) starts a word.
    cont = tok.convert_tokens_to_ids("##s")
    ids2 = torch.tensor([[tok.cls_token_id, cont, cont, tok.sep_token_id]])
    _, labels = mask_tokens(ids2, torch.ones_like(ids2), tables, 0.15, torch.Generator().manual_seed(0))
    assert (labels[0, 1:3] != -100).all() and (labels[0, [0, 3]] == -100).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_with_a_cpu_generator(tok):
    tables = MaskingTables.from_tokenizer(tok)
    ids, attn = _batch(tok, CAPTIONS * 16)
    cpu = mask_tokens(ids, attn, tables, 0.15, torch.Generator().manual_seed(3))
    gpu = mask_tokens(ids.cuda(), attn.cuda(), tables.to("cuda"), 0.15, torch.Generator().manual_seed(3))
    assert gpu[0].device.type == "cuda"
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def test_masked_tokens_per_caption_stay_within_the_row_cap_by_whole_words(tok):
    tables = MaskingTables.from_tokenizer(tok)
    ids, attn = _batch(tok, CAPTIONS * 4)
    _, labels = mask_tokens(ids, attn, tables, 1.0, torch.Generator().manual_seed(0))  # every word chosen, then capped
    chosen = labels != -100
    cap = mlm_row_cap(ids.shape[1])
    assert (chosen.sum(dim=1) <= cap).all() and chosen.any(dim=1).any()
    assert (chosen.sum(dim=1) < (attn.bool() & ~torch.isin(ids, torch.tensor(tok.all_special_ids))).sum(dim=1)).any()
    for b in range(ids.shape[0]):
        for span in _words(tok, ids[b], attn[b]):
            assert chosen[b, span].all() or not chosen[b, span].any()
