"""The fusion module and MLM head: caption tokens attend with the image before predicting masks."""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FusionHead

FUSION_HEADS: tuple[str, ...] = typing.get_args(FusionHead)


class FusionMLM(nn.Module):
    """Pre-LN transformer over [text token states; a learned image token; the image embedding].

    ``head="pmc-clip"`` (the default) is PMC-CLIP's fusion, so its released weights load one to one
    (``model/pmc_clip.py``): the L2-normalised image embedding goes straight in (a linear map brings
    it to the text width only where the widths differ; PMC-CLIP needs them equal), no final norm,
    and one bias-free projection to the vocabulary. ``head="mlp"`` is the earlier layout of this
    project (an image projection, a final LayerNorm, a BERT-style transform before the decoder),
    kept so run folders made with it still load. Padding is masked out of attention (PMC-CLIP
    attends to it). The MLM head runs only at the given positions: [M, V] for M rows.
    """

    def __init__(
        self, width: int, embed_dim: int, vocab_size: int, layers: int = 4, heads: int = 8, head: str = "pmc-clip"
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by model.fusion_heads={heads}")
        if head not in FUSION_HEADS:
            raise ValueError(f"model.fusion_head must be one of {FUSION_HEADS}, got {head!r}")
        self.pmc_clip = head == "pmc-clip"
        self.image_proj = nn.Identity() if self.pmc_clip and embed_dim == width else nn.Linear(embed_dim, width)
        self.image_token = nn.Parameter(torch.randn(width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if self.pmc_clip:
            self.head = nn.Linear(width, vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=width**-0.5)
        else:
            self.ln_final = nn.LayerNorm(width)
            self.head = nn.Sequential(
                nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, vocab_size)
            )

    def forward(
        self,
        text_states: torch.Tensor,  # [B, L, H]
        attention_mask: torch.Tensor,  # [B, L], 1 for real tokens
        image_embedding: torch.Tensor,  # [B, D]
        masked_rows: torch.Tensor,  # [M] int64, flat positions b * L + l to predict
    ) -> torch.Tensor:  # [M, V]
        b, length = text_states.shape[:2]
        if self.pmc_clip:
            image_embedding = F.normalize(image_embedding.float(), dim=-1)
        image = self.image_proj(image_embedding.to(text_states.dtype))[:, None]
        image_token = self.image_token.to(text_states.dtype).expand(b, 1, -1)
        x = torch.cat([text_states, image_token, image], dim=1)
        padding = torch.cat([attention_mask == 0, attention_mask.new_zeros(b, 2, dtype=torch.bool)], dim=1)
        x = self.blocks(x, src_key_padding_mask=padding)[:, :length].reshape(b * length, -1)[masked_rows]
        return self.head(x if self.pmc_clip else self.ln_final(x))
