"""Loss and perturbation ops: plain-PyTorch references, and fused Triton kernels beside them.

Imported as ``unimlip_fast.kernels``. ``resolve_ops`` picks one implementation per run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .dropblock import dropblock_reference
from .infonce import infonce_reference
from .ntxent import ntxent_reference

KERNEL_CHOICES = ("auto", "reference", "triton")


@dataclass(frozen=True)
class LossOps:
    """The implementations the objective calls; one set is chosen per run."""

    name: str
    infonce: Callable[..., torch.Tensor]
    ntxent: Callable[..., torch.Tensor]
    dropblock: Callable[..., torch.Tensor]


REFERENCE_OPS = LossOps("reference", infonce_reference, ntxent_reference, dropblock_reference)


def resolve_ops(choice: str, device: torch.device) -> LossOps:
    """``auto`` takes Triton on CUDA and the reference elsewhere."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "reference" or (choice == "auto" and device.type != "cuda"):
        return REFERENCE_OPS
    raise NotImplementedError("the fused Triton kernels are not built yet (issue 3)")
