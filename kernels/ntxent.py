"""SimCLR's NT-Xent over two views, as in SLIP, with the self-similarity masked.

Plain-PyTorch reference (test oracle and fallback). Rows are this rank's views, columns the
gathered views of the global batch; row ``i`` pairs with column ``row_offset + i``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ntxent_reference(
    za: torch.Tensor,  # [B, D] L2-normalised first views (local rows)
    zb: torch.Tensor,  # [B, D] L2-normalised second views (local rows)
    tau: float,
    za_all: torch.Tensor | None = None,  # [N, D] gathered first views (columns)
    zb_all: torch.Tensor | None = None,  # [N, D] gathered second views (columns)
    row_offset: int = 0,
) -> torch.Tensor:
    """For each view, CE over the 2N - 1 other views with its partner as the target; mean of both."""
    za_all = za if za_all is None else za_all
    zb_all = zb if zb_all is None else zb_all
    b = za.shape[0]
    targets = torch.arange(b, device=za.device) + row_offset
    self_mask = F.one_hot(targets, za_all.shape[0]).bool()
    za, zb, za_all, zb_all = za.float(), zb.float(), za_all.float(), zb_all.float()
    logits_aa = (za @ za_all.T / tau).masked_fill(self_mask, float("-inf"))
    logits_bb = (zb @ zb_all.T / tau).masked_fill(self_mask, float("-inf"))
    logits_ab = za @ zb_all.T / tau
    logits_ba = zb @ za_all.T / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), targets)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), targets)
    return 0.5 * (loss_a + loss_b)
