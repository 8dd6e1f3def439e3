"""Start from a PMC-CLIP checkpoint (the paper starts from PMC-CLIP's epoch 100).

PMC-CLIP names its parts ``visual.*`` (the same modified ResNet as ours), ``text_encoder.*`` (a
BERT), ``text_projection`` ([width, embed], applied as ``x @ P``), ``fusion_module.resblocks.N.*``
(CLIP's pre-LN residual attention blocks, GELU, no final norm), ``img_special_token`` ([1, 1, embed]),
``mlm_projection`` ([width, vocab], bias-free, applied as ``x @ P``) and a 0-dim ``logit_scale``; its
unused ``positional_embedding`` and ``ln_final`` come along. With ``model.fusion_head=pmc-clip``
(the default) and the embedding as wide as the text encoder (768 and 768 in PMC-CLIP), every fusion
and MLM weight has its place. This maps them onto ours; whatever does not map, or does not fit, is
reported, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..weights_file import load_weights_only

_FUSION_BLOCK = {
    "attn.in_proj_weight": "self_attn.in_proj_weight",
    "attn.in_proj_bias": "self_attn.in_proj_bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "linear1.weight",
    "mlp.c_fc.bias": "linear1.bias",
    "mlp.c_proj.weight": "linear2.weight",
    "mlp.c_proj.bias": "linear2.bias",
}


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not in the checkpoint: left as initialised
    unexpected: list[str] = field(default_factory=list)  # theirs, with no place in our model
    mismatched: list[str] = field(default_factory=list)  # both, but of different shapes

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}; "
            f"unexpected {len(self.unexpected)}; shape-mismatched {len(self.mismatched)}"
        )


def map_pmc_clip_key(key: str, value: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    """One PMC-CLIP name and tensor -> our name (None where there is none) and tensor."""
    key = key.removeprefix("module.")
    if key.startswith("visual."):
        return key, value
    if key.startswith("text_encoder."):
        return "text.encoder." + key.removeprefix("text_encoder."), value
    if key == "text_projection":
        return "text_projection.weight", value.T.contiguous()
    if key == "logit_scale":
        return "logit_scale", value.reshape(1)
    if key == "img_special_token":
        return "fusion.image_token", value.reshape(-1)
    if key == "mlm_projection":
        return "fusion.head.weight", value.T.contiguous()
    match = re.fullmatch(r"fusion_module\.resblocks\.(\d+)\.(.+)", key)
    if match and match.group(2) in _FUSION_BLOCK:
        return f"fusion.blocks.layers.{match.group(1)}.{_FUSION_BLOCK[match.group(2)]}", value
    return None, value


def read_pmc_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of PMC-CLIP's checkpoint file (under ``state_dict``, or the file's own mapping)."""
    checkpoint = load_weights_only(path, map_location="cpu")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a PMC-CLIP checkpoint (expected a state_dict mapping of tensors)")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], mapping=map_pmc_clip_key) -> LoadReport:
    """Every tensor of ``state`` that ``mapping`` places in ``model`` at the right shape, loaded; the
    rest reported."""
    ours = model.state_dict()
    report, mapped = LoadReport(), {}
    for key, value in state.items():
        name, value = mapping(key, value)
        if name is None or name not in ours:
            report.unexpected.append(key)
        elif ours[name].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
        else:
            mapped[name] = value
    report.loaded = sorted(mapped)
    report.missing = sorted(set(ours) - set(mapped))
    model.load_state_dict(mapped, strict=False)
    return report


def same_name(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A run of this project: its names are ours."""
    return key, value


def map_open_clip_key(key: str, value: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    """An open_clip (or exported) name and tensor -> ours; open_clip's 0-dim logit scale as our [1]."""
    from ..export import from_open_clip_name

    name = from_open_clip_name(key)
    return name, (value.reshape(1) if name == "logit_scale" else value)
