"""The fusion module and MLM head: caption tokens attend with the image before predicting masks."""
from __future__ import annotations

import torch
from torch import nn


class FusionMLM(nn.Module):
    """Pre-LN transformer over [text tokens; a learned image token; the image embedding].

    Padding is masked out of attention; the MLM head runs only at the masked positions, so its
    output is [M, V] for M masked tokens rather than [B, L, V].
    """

    def __init__(self, width: int, embed_dim: int, vocab_size: int, layers: int = 4, heads: int = 8):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by model.fusion_heads={heads}")
        self.image_proj = nn.Linear(embed_dim, width)
        self.image_token = nn.Parameter(torch.randn(width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, vocab_size))

    def forward(
        self,
        text_states: torch.Tensor,  # [B, L, H]
        attention_mask: torch.Tensor,  # [B, L], 1 for real tokens
        image_embedding: torch.Tensor,  # [B, D]
        masked: torch.Tensor,  # [B, L] bool, the positions to predict
    ) -> torch.Tensor:  # [M, V]
        b = text_states.shape[0]
        image = self.image_proj(image_embedding.to(text_states.dtype))[:, None]
        image_token = self.image_token.to(text_states.dtype).expand(b, 1, -1)
        x = torch.cat([text_states, image_token, image], dim=1)
        padding = torch.cat([attention_mask == 0, attention_mask.new_zeros(b, 2, dtype=torch.bool)], dim=1)
        x = self.blocks(x, src_key_padding_mask=padding)
        return self.head(self.ln_final(x[:, : text_states.shape[1]][masked]))
