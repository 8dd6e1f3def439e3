"""SimCLR's NT-Xent over two views: the paper's Eq. 2 (cross-view), or SLIP's 2B - 1 candidates.

Plain-PyTorch reference (test oracle and fallback). Rows are this rank's views, columns the
gathered views of the global batch; row ``i`` pairs with column ``row_offset + i``.

``negatives``:
- ``cross-view`` (the paper's Eq. 2, the default): each view's denominator runs over the N views
  of the *other* side only. That is exactly symmetric InfoNCE between the two views with the
  scale fixed at 1 / tau, and it is computed as such (one implementation of that loss).
- ``all`` (SLIP, SimCLR's paper): over the 2N - 1 other views of both sides, itself excluded.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F

from unimlip_fast.config import SimclrNegatives  # absolute: transformers may import this folder as `kernels`

from .infonce import infonce_reference

SIMCLR_NEGATIVES: tuple[str, ...] = typing.get_args(SimclrNegatives)


def check_negatives(negatives: str) -> None:
    if negatives not in SIMCLR_NEGATIVES:
        raise ValueError(f"loss.simclr_negatives must be one of {SIMCLR_NEGATIVES}, got {negatives!r}")


def ntxent_reference(
    za: torch.Tensor,  # [B, D] L2-normalised first views (local rows)
    zb: torch.Tensor,  # [B, D] L2-normalised second views (local rows)
    tau: float,
    za_all: torch.Tensor | None = None,  # [N, D] gathered first views (columns)
    zb_all: torch.Tensor | None = None,  # [N, D] gathered second views (columns)
    row_offset: int = 0,
    negatives: str = "cross-view",
) -> torch.Tensor:
    """For each view, CE over the candidates ``negatives`` names, its partner the target; mean of
    both views. Computed in at least fp32 (float64 inputs stay float64)."""
    check_negatives(negatives)
    za_all = za if za_all is None else za_all
    zb_all = zb if zb_all is None else zb_all
    acc = torch.promote_types(za.dtype, torch.float32)
    if negatives == "cross-view":
        scale = torch.full((1,), 1.0 / tau, dtype=acc, device=za.device)
        return infonce_reference(za, zb, scale, za_all, zb_all, row_offset)
    b = za.shape[0]
    targets = torch.arange(b, device=za.device) + row_offset
    self_mask = F.one_hot(targets, za_all.shape[0]).bool()
    za, zb, za_all, zb_all = za.to(acc), zb.to(acc), za_all.to(acc), zb_all.to(acc)
    logits_aa = (za @ za_all.T / tau).masked_fill(self_mask, float("-inf"))
    logits_bb = (zb @ zb_all.T / tau).masked_fill(self_mask, float("-inf"))
    logits_ab = za @ zb_all.T / tau
    logits_ba = zb @ za_all.T / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), targets)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), targets)
    return 0.5 * (loss_a + loss_b)
