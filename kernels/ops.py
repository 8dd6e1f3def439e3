"""Loss and perturbation ops: plain-PyTorch references, and fused Triton kernels beside them.

Imported as ``unimlip_fast.kernels.ops`` (the top-level ``kernels/`` folder is the package's
``unimlip_fast.kernels``: a namespace package with no ``__init__.py``, so it can never shadow another
package named ``kernels`` when run from the repository root). ``resolve_ops`` picks one implementation
per run. The Triton files (``contrastive_triton.py``, ``dropblock_triton.py``) are imported only when the
Triton ops are asked for, so the package imports where triton is not installed.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Kernels
from .dropblock import dropblock_reference
from .infonce import infonce_reference, itc_terms_reference
from .ntxent import ntxent_reference

KERNEL_CHOICES: tuple[str, ...] = typing.get_args(Kernels)


@dataclass(frozen=True)
class LossOps:
    """The implementations the objective calls; one set is chosen per run.

    infonce(img, txt, scale, img_all, txt_all, row_offset) -> loss
    ntxent(za, zb, tau, za_all, zb_all, row_offset, negatives="cross-view" | "all") -> loss
    dropblock(x, p, block_size) -> x with blocks dropped
    itc_terms(imgs, txts, scale, imgs_all, txts_all, row_offset) -> [K] losses, term k on
        (imgs[k], txts[k]); the same as K infonce calls
    """

    name: str
    infonce: Callable[..., torch.Tensor]
    ntxent: Callable[..., torch.Tensor]
    dropblock: Callable[..., torch.Tensor]
    itc_terms: Callable[..., torch.Tensor]


REFERENCE_OPS = LossOps("reference", infonce_reference, ntxent_reference, dropblock_reference, itc_terms_reference)


def triton_ops() -> LossOps:
    """The fused Triton kernels (imports triton)."""
    from .contrastive_triton import infonce_triton, itc_terms_triton, ntxent_triton
    from .dropblock_triton import dropblock_triton

    return LossOps("triton", infonce_triton, ntxent_triton, dropblock_triton, itc_terms_triton)


# The kernels are tuned for, and their bf16 tl.dot needs, Ampere or newer (V100, sm_70, has no bf16 Tensor
# Cores); on older GPUs ``auto`` takes the reference.
TRITON_MIN_CAPABILITY = (8, 0)


def reference_reason(device: torch.device) -> str | None:
    """Why ``model.kernels=auto`` takes the reference on ``device``; None when it takes Triton."""
    if device.type != "cuda":
        return "no CUDA device"
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability < TRITON_MIN_CAPABILITY:
            return (
                f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}, older than the "
                f"sm_{TRITON_MIN_CAPABILITY[0]}{TRITON_MIN_CAPABILITY[1]} the Triton kernels need"
            )
    return None


def resolve_ops(choice: Kernels, device: torch.device) -> LossOps:
    """``auto`` takes Triton on CUDA GPUs of sm_80 or newer and the reference elsewhere
    (``reference_reason`` says why). ``triton`` off CUDA needs Triton's interpreter
    (``TRITON_INTERPRET=1``, set before triton is imported; for tests)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "reference" or (choice == "auto" and reference_reason(device) is not None):
        return REFERENCE_OPS
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"model.kernels=triton needs a CUDA device (this run is on {device.type}); use "
            "model.kernels=reference or auto, or TRITON_INTERPRET=1 to run the kernels in Triton's "
            "slow interpreter"
        )
    return triton_ops()


def kernels_note(choice: str, ops: LossOps, device: torch.device) -> str:
    """The "kernels: ..." line of the run's log."""
    reason = reference_reason(device) if choice == "auto" and ops.name == "reference" else None
    return f"kernels: {ops.name} (model.kernels={choice}, device {device.type}" + (f": {reason})" if reason else ")")


def __getattr__(name: str) -> LossOps:
    """``TRITON_OPS``, built on first use (PEP 562) so that importing this package needs no triton."""
    if name == "TRITON_OPS":
        return triton_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
