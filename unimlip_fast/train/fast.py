"""The fast training step: each speed-up chosen once per run, logged, and switchable on its own.

``train.fast: auto | true | false`` (``auto``: on for CUDA). Off, the step is the reference one;
on, each of these keys takes effect, so each can be measured alone:

- ``train.channels_last``: the image trunk runs channels-last (NHWC), the layout cuDNN's Tensor
  Core convolutions want: the images enter NHWC and every convolution follows its input. (The
  weights stay NCHW: ZeRO keeps them in flat buffers, and DeepSpeed's broadcast needs them dense.)
- ``train.compile``: ``torch.compile`` of the image trunk and the text tower. The first step of
  each phase compiles; the trainer logs its time apart and keeps it out of samples/s.
- ``train.sdpa``: attention through ``scaled_dot_product_attention``'s fused kernels (flash,
  memory-efficient) in the text encoder (transformers' ``attn_implementation="sdpa"``), the
  attention pool and the fusion module. Off: SDPA's math backend, the plain softmax(QK^T/sqrt(d))V
  composition, everywhere.
- ``train.fused_adamw``: torch's fused AdamW (one kernel over all parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig


@dataclass(frozen=True)
class FastChoices:
    channels_last: bool = False
    compile: bool = False
    sdpa: bool = False
    fused_adamw: bool = False

    def note(self, setting: object, device: torch.device) -> str:
        """The "fast: ..." line of the run's log."""
        chosen = [
            name
            for name, on in (
                ("channels-last", self.channels_last),
                ("torch.compile (image trunk, text tower)", self.compile),
                ("fused SDPA attention", self.sdpa),
                ("fused AdamW", self.fused_adamw),
            )
            if on
        ]
        why = f"train.fast={str(setting).lower()}, device {device.type}"
        if not chosen:
            return f"fast: off ({why}): NCHW, eager, plain attention, unfused AdamW"
        off = [key for key in ("channels_last", "compile", "sdpa", "fused_adamw") if not getattr(self, key)]
        return f"fast: {', '.join(chosen)} ({why}" + (f"; off by key: {', '.join(off)})" if off else ")")


REFERENCE_STEP = FastChoices()


def resolve_fast(train: TrainConfig, device: torch.device) -> FastChoices:
    """``train.fast`` and the per-speed-up keys -> what this run does."""
    if not (train.fast is True or (train.fast == "auto" and device.type == "cuda")):
        return REFERENCE_STEP
    return FastChoices(train.channels_last, train.compile, train.sdpa, train.fused_adamw)


def apply_fast(model: nn.Module, choices: FastChoices, compile_backend: str = "inductor") -> None:
    """Set up ``model`` (a UniMlip, before DeepSpeed wraps it) for the chosen step. The weights and
    their names do not change, so checkpoints are the same either way."""
    if choices.channels_last:  # the input's layout: convolutions follow it (the weights stay NCHW, as ZeRO
        model.visual.memory_format = torch.channels_last  # flattens them, and its broadcast needs them dense)
    if choices.sdpa:
        model.text.encoder.set_attn_implementation("sdpa")
    else:
        hooks = _PlainAttention()
        model.register_forward_pre_hook(hooks.enter)
        model.register_forward_hook(hooks.exit, always_call=True)
    if choices.compile:
        # The trunk is a method (its weights keep their names under ``visual.``); the tower a module.
        model.visual.trunk = torch.compile(model.visual.trunk, backend=compile_backend)
        model.text.compile(backend=compile_backend)


class _PlainAttention:
    """Forward hooks that run the model's forward under SDPA's math backend (hooks rather than a
    wrapped ``forward``: a deep copy of the model gets its own)."""

    def __init__(self):
        self.open = []

    def enter(self, module, args):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.MATH)
        context.__enter__()
        self.open.append(context)

    def exit(self, module, args, output):
        self.open.pop().__exit__(None, None, None)
