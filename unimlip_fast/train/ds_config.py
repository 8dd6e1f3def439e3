"""The DeepSpeed config: the user's JSON for ZeRO and precision, the recipe for everything else.

Batch size, gradient clipping and the optimizer come from the recipe; a DeepSpeed JSON may leave
them out or say "auto". A conflicting value is an error rather than a silent override.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from .accumulate import micro_batch_plan

_OWNED_BY_RECIPE = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def default_ds_config() -> dict[str, Any]:
    """Used when no --ds-config is given: ZeRO-2 in fp32 (works everywhere, CPU included)."""
    return {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}}


def load_ds_config(path: str | None) -> dict[str, Any]:
    if not path:
        return default_ds_config()
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def resolve_ds_config(ds: dict[str, Any], cfg: Config, world_size: int) -> dict[str, Any]:
    ds = dict(ds)
    micro, accumulation = micro_batch_plan(cfg.train.batch_size, world_size, cfg.train.micro_batch_size)
    wanted = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        # Micro-batches are accumulated contrastive-exactly (train/accumulate.py), never as
        # independent losses: the recipe's train.micro_batch_size sets this.
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key in _OWNED_BY_RECIPE:
        if key in ds and ds[key] != "auto" and ds[key] != wanted[key]:
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but the recipe says {wanted[key]}; "
                f"set it in the recipe (train.batch_size, train.micro_batch_size, "
                f"train.grad_clip) or 'auto' in the JSON"
            )
        ds[key] = wanted[key]
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"DeepSpeed config has an '{key}' section; the optimizer and schedule come "
                f"from the recipe (train.lr, train.warmup_steps, ...). Remove it."
            )
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW (fused on CUDA) under ZeRO
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision_of(ds: dict[str, Any]) -> str:
    """A short name for the logs: fp32, bf16, fp16, autocast-bf16, autocast-fp16."""
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled"):
        return "autocast-" + {"bfloat16": "bf16", "float16": "fp16"}.get(autocast.get("dtype", "bfloat16"), "?")
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def fp32_variant(ds: dict[str, Any]) -> dict[str, Any]:
    """The same config with bf16/fp16 and autocast switched off (CPU runs: bf16 there is slow)."""
    ds = dict(ds)
    for key in ("bf16", "fp16", "torch_autocast"):
        if key in ds:
            ds[key] = {**ds[key], "enabled": False}
    return ds
