"""Whole-word MLM masking on token ids, vectorised over the batch (no loop over words or tokens).

A word is a run of tokens that starts at a word-initial token (``word_start[id]``; in WordPiece
every token but the ``##`` continuations) and goes on through its continuations. Words are chosen
with probability ``mlm_prob`` (and at least one per non-empty caption); every token of a chosen
word is masked: 80% -> ``[MASK]``, 10% -> a random non-special token, 10% unchanged (BERT's split,
drawn per token as in HF's whole-word collator). Special tokens and padding are never chosen.
At most ``mlm_row_cap(length)`` tokens of a caption are masked (the first chosen words, whole; of a first
word longer than that, its first tokens), so
the model can select the masked positions into a buffer of a fixed size (no data-dependent shape,
no host sync on a GPU).
Works on CPU or CUDA tensors; pass a ``torch.Generator`` on the tensors' device to reproduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MLM_MAX_ROW_FRACTION = 0.3  # twice BERT's 15%: a cap that whole-word masking reaches only on rare captions


def mlm_row_cap(length: int) -> int:
    """The most tokens masked in one caption of ``length`` positions."""
    return max(1, math.ceil(MLM_MAX_ROW_FRACTION * length))


@dataclass
class MaskingTables:
    word_start: torch.Tensor  # [V] bool: the token begins a word
    special: torch.Tensor  # [V] bool: never masked, never drawn as a random replacement
    mask_id: int
    vocab_size: int
    random_ids: torch.Tensor  # [R] int64: the ids a random replacement is drawn from

    @classmethod
    def from_tokenizer(cls, tok) -> MaskingTables:
        """From a HF tokenizer: WordPiece (``##`` continuations), or SentencePiece/byte-level BPE
        (``▁``/``Ġ`` mark word starts) when the vocabulary has no ``##`` tokens."""
        if tok.mask_token_id is None:
            raise ValueError(f"{type(tok).__name__} has no mask token; MLM needs one")
        v = len(tok)
        tokens = tok.convert_ids_to_tokens(list(range(v)))
        tokens = ["" if t is None else t for t in tokens]
        if any(t.startswith("##") for t in tokens):
            word_start = [not t.startswith("##") for t in tokens]
        else:
            marker = "▁" if any(t.startswith("▁") for t in tokens) else "Ġ"
            word_start = [t.startswith(marker) for t in tokens]
        special = torch.zeros(v, dtype=torch.bool)
        special[[i for i in tok.all_special_ids if 0 <= i < v]] = True
        special[tok.mask_token_id] = True
        return cls(
            word_start=torch.tensor(word_start, dtype=torch.bool),
            special=special,
            mask_id=int(tok.mask_token_id),
            vocab_size=v,
            random_ids=torch.nonzero(~special).squeeze(1),
        )

    def to(self, device) -> MaskingTables:
        return MaskingTables(
            self.word_start.to(device),
            self.special.to(device),
            self.mask_id,
            self.vocab_size,
            self.random_ids.to(device),
        )


def _rand(shape, like: torch.Tensor, generator) -> torch.Tensor:
    gdev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=gdev).to(like.device)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tables: MaskingTables,
    mlm_prob: float = 0.15,
    generator: torch.Generator | None = None,
    min_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_ids, labels)`` for ``input_ids [B,L]``; ``labels`` is -100 where not masked."""
    if tables.word_start.device != input_ids.device:
        tables = tables.to(input_ids.device)
    ids = input_ids.long()
    b, length = ids.shape
    valid = attention_mask.bool() & ~tables.special[ids]
    prev_valid = torch.nn.functional.pad(valid[:, :-1], (1, 0), value=False)
    # A word starts at a word-initial token, or at a continuation with no word before it (truncation).
    start = valid & (tables.word_start[ids] | ~prev_valid)
    word = torch.cumsum(start.long(), dim=1)  # [B,L] 1-based word number; carried through continuations

    u = _rand((b, length), ids, generator)
    chosen_start = start & (u < mlm_prob)
    if min_one:  # a caption with words but none chosen gets one, picked uniformly among its words
        need = start.any(dim=1) & ~chosen_start.any(dim=1)
        key = torch.where(start, _rand((b, length), ids, generator), torch.full_like(u, -1.0))
        pick = torch.zeros_like(start).scatter_(1, key.argmax(dim=1, keepdim=True), True)
        chosen_start = chosen_start | (pick & need.unsqueeze(1))
    # Spread each word's choice over its tokens: a per-row table indexed by word number (column 0
    # collects the non-starts, always False, so the scatter has no conflicting writes).
    table = torch.zeros(b, length + 1, dtype=torch.bool, device=ids.device)
    table.scatter_(1, torch.where(start, word, 0), chosen_start)
    chosen = table.gather(1, word) & valid
    # The cap, by whole words: a word is kept when the chosen tokens up to its end are within it.
    upto = torch.cumsum(chosen.long(), dim=1)
    word_end = torch.zeros(b, length + 1, dtype=torch.long, device=ids.device).scatter_reduce_(
        1, word, torch.where(chosen, upto, 0), reduce="amax"
    )
    cap = mlm_row_cap(length)
    whole = chosen & (word_end.gather(1, word) <= cap)
    # A caption whose first chosen word alone is longer than the cap keeps that word's first ``cap`` tokens.
    partial = chosen & (upto <= cap) & (chosen.any(dim=1) & ~whole.any(dim=1)).unsqueeze(1)
    chosen = whole | partial

    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = _rand((b, length), ids, generator)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    pool = tables.random_ids
    rand_ids = pool[(_rand((b, length), ids, generator) * len(pool)).long().clamp_(max=len(pool) - 1)]
    out = torch.where(to_mask, torch.full_like(ids, tables.mask_id), ids)
    out = torch.where(to_random, rand_ids, out)
    return out.to(input_ids.dtype), labels
