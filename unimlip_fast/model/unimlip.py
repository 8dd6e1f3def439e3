"""Uni-Mlip assembled: image and text towers, projections, SimCLR head, fusion MLM, logit scale.

``forward(batch, phase)`` returns the features of DESIGN.md, the seam between model and objective:
``img``, ``txt`` (and their perturbed versions), ``simclr_a``/``simclr_b`` in the SimCLR phase,
``mlm_logits``/``mlm_targets`` when MLM is on (a fixed number of rows; target -100 past the masked
ones), and ``logit_scale`` (exponentiated, [1]). The trainer
clamps the parameter after each optimizer step (``train/replicas.py``), so the forward pass never
cuts its gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig, ModelConfig
from ..data.masking import mlm_row_cap
from ..kernels.ops import REFERENCE_OPS, LossOps
from .fusion import FusionMLM
from .text import TextTower, build_text_encoder
from .visual import BatchNorm1d, ModifiedResNet, set_batchnorm_stats_frozen

WARMUP, SIMCLR = "warmup", "simclr"


class SimCLRHead(nn.Module):
    """SLIP's image MLP: two hidden layers with BatchNorm and ReLU, then the output projection."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UniMlip(nn.Module):
    def __init__(self, cfg: ModelConfig, loss: LossConfig, text_encoder: nn.Module, cls_token_id: int, vocab_size: int):
        super().__init__()
        self.cfg, self.loss_cfg = cfg, loss
        self.visual = ModifiedResNet(
            cfg.vision_layers, cfg.embed_dim, cfg.vision_heads, cfg.image_size, cfg.vision_width
        )
        self.text = TextTower(text_encoder, cls_token_id)
        self.text_projection = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=self.text.width**-0.5)
        self.simclr_head = SimCLRHead(cfg.embed_dim, cfg.simclr_hidden, cfg.simclr_out) if loss.simclr > 0 else None
        self.fusion = (
            FusionMLM(self.text.width, cfg.embed_dim, vocab_size, cfg.fusion_layers, cfg.fusion_heads, cfg.fusion_head)
            if loss.mlm > 0
            else None
        )
        # Shape [1], not a 0-dim tensor: DeepSpeed rejects 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full([1], math.log(cfg.logit_scale_init)))
        self.ops: LossOps = REFERENCE_OPS

    # --- encoders used by evaluation -----------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _, sentence = self.text(input_ids, attention_mask)
        return self.text_projection(sentence)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp()

    # --- training forward ----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], phase: str = WARMUP) -> dict[str, torch.Tensor]:
        views_fed = phase == SIMCLR and "image_a" in batch  # strong views, with or without SimCLR
        simclr_on = views_fed and self.simclr_head is not None
        set_batchnorm_stats_frozen(self.visual, phase == SIMCLR and self.loss_cfg.freeze_bn_stats)
        features: dict[str, torch.Tensor] = {"logit_scale": self.scale()}
        b = batch["image"].shape[0]

        images = batch["image"]
        if views_fed:
            # One pass over the weak and both strong views: larger GEMMs, and with frozen BatchNorm
            # statistics the views cannot influence each other's normalisation.
            images = torch.cat([images, batch["image_a"], batch["image_b"]])
        feature_map = self.visual.trunk(images)
        pooled = self.visual.attnpool(feature_map)
        features["img"] = pooled[:b]
        if simclr_on:
            z = self.simclr_head(pooled[b:])
            features["simclr_a"], features["simclr_b"] = z[:b], z[b:]
        if self.loss_cfg.itc_img_fp > 0:
            dropped = self.ops.dropblock(feature_map[:b], self.cfg.dropblock_p, self.cfg.dropblock_size)
            features["img_perturbed"] = self.visual.attnpool(dropped)

        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        mlm_labels = batch.get("mlm_labels")
        states, sentence = self.text(input_ids, attention_mask)
        if self.cfg.unmasked_itc_pass and mlm_labels is not None:
            clean_ids = torch.where(mlm_labels >= 0, mlm_labels, input_ids)
            _, sentence = self.text(clean_ids, attention_mask)
        features["txt"] = self.text_projection(sentence)
        if self.loss_cfg.itc_txt_fp > 0:
            dropped = F.dropout(sentence, p=self.cfg.text_dropout, training=True)
            features["txt_perturbed"] = self.text_projection(dropped)

        if self.fusion is not None and mlm_labels is not None:
            # A fixed number of rows (no data-dependent shape: no host sync, traceable); the masking caps the
            # masked tokens per caption at mlm_row_cap, and the rows past the masked ones have target -100.
            flat_labels = mlm_labels.reshape(-1)
            cap = mlm_labels.shape[0] * mlm_row_cap(mlm_labels.shape[1])
            rows = torch.nonzero_static(flat_labels >= 0, size=cap, fill_value=0).squeeze(1)
            filled = torch.arange(cap, device=rows.device) < (flat_labels >= 0).sum()
            features["mlm_logits"] = self.fusion(states, attention_mask, features["img"], rows)
            features["mlm_targets"] = torch.where(filled, flat_labels[rows], torch.full_like(rows, -100))
        return features


def build_model(cfg: ModelConfig, loss: LossConfig, tokenizer, pretrained_text: bool = True) -> UniMlip:
    """The assembled model; ``pretrained_text=False`` skips loading text weights (they come next)."""
    encoder = build_text_encoder(cfg.text, tokenizer, pretrained=pretrained_text)
    return UniMlip(cfg, loss, encoder, tokenizer.cls_token_id, len(tokenizer))
