"""The Uni-Mlip model and what a run folder needs to rebuild it without downloads."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..config import Config, load_config
from .text import build_tokenizer
from .unimlip import SIMCLR, WARMUP, UniMlip, build_model

__all__ = ["SIMCLR", "WARMUP", "UniMlip", "assemble", "build_model", "build_tokenizer", "load_trained",
           "save_text_artifacts"]


def save_text_artifacts(model: UniMlip, tokenizer, run_dir: Path) -> None:
    """The tokenizer and the text encoder's config, so evaluation needs no hub access."""
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    model.text.encoder.config.to_json_file(str(run_dir / "text_encoder_config.json"))


def load_trained(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[UniMlip, object, Config]:
    """A run folder (its ``model.safetensors``) or a ``.safetensors`` file inside one -> (model, tokenizer, cfg)."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    weights = path / "model.safetensors" if path.is_dir() else path
    run_dir = weights.parent
    if path.is_dir() and not weights.exists() and (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{checkpoint} is not a finished run: no model.safetensors yet (training writes it "
                                "at the end; `unimlip-fast pretrain ... --resume latest` finishes it)")
    for needed in (weights, run_dir / "config.yaml", run_dir / "tokenizer", run_dir / "text_encoder_config.json"):
        if not needed.exists():
            raise FileNotFoundError(f"checkpoint incomplete: {needed} not found (is {checkpoint} a finished run?)")
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    text_config = AutoConfig.from_pretrained(str(run_dir / "text_encoder_config.json"))
    model = assemble(cfg, tokenizer, text_config, load_file(str(weights)), weights)
    return model.to(device).eval(), tokenizer, cfg


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
