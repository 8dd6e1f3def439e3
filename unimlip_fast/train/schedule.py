"""Learning-rate schedule, parameter groups and the phase boundary."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError, TrainConfig


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (1-d tensors), embeddings of position, the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or "positional_embedding" in name or "image_token" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW; ``fused`` (train.fused_adamw under train.fast) defaults to on for CUDA."""
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def phase_start_step(spec: str, steps_per_epoch: int, total_steps: int) -> int:
    """``train.simclr_start``: steps ("500"), epochs ("2ep"), or a fraction of the run ("0.5")."""
    spec = str(spec).strip()
    try:
        if spec.endswith("ep"):
            return int(float(spec[:-2]) * steps_per_epoch)
        if "." in spec:
            fraction = float(spec)
            if not 0.0 <= fraction <= 1.0:
                raise ValueError
            return int(fraction * total_steps)
        return int(spec)
    except ValueError:
        raise ConfigError(
            f"train.simclr_start must be steps (500), epochs (2ep) or a fraction (0.5), got {spec!r}"
        ) from None
