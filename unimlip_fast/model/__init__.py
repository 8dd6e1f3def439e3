"""The Uni-Mlip model, and :func:`assemble`, which rebuilds a trained one from its config, text config and
weights (a run folder: :meth:`unimlip_fast.run_folder.RunFolder.load_model`; an export: :mod:`unimlip_fast.export`)."""

from __future__ import annotations

import torch
from transformers import AutoModel

from ..config import Config
from .text import build_tokenizer
from .unimlip import SIMCLR, WARMUP, UniMlip, build_model

__all__ = ["SIMCLR", "WARMUP", "UniMlip", "assemble", "build_model", "build_tokenizer"]


def assemble(cfg: Config, tokenizer, text_config, state_dict: dict[str, torch.Tensor], source) -> UniMlip:
    """The model of ``cfg`` with the text encoder of ``text_config``, holding exactly ``state_dict``."""
    encoder = AutoModel.from_config(text_config, add_pooling_layer=False)
    if "fusion.ln_final.weight" in state_dict:  # a run made before PMC-CLIP's fusion head was the default
        cfg.model.fusion_head = "mlp"
    model = UniMlip(cfg.model, cfg.loss, encoder, tokenizer.cls_token_id, len(tokenizer))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{source} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
