"""Non-finite steps: skipped on every rank, counted, and too many in a row stop the run.

The check adds no host synchronisation to the step. DeepSpeed's optimizer step already all-reduces
the global gradient norm and reads it on the host (for clipping and its loss scaler); when that
norm is not finite it skips the update on every rank: no weight and no optimizer moment moves, and
the lr schedule does not advance. ``engine.was_step_applied()`` then tells the loop, which does not
count the step either, so the next batch trains at the same step and lr. (BatchNorm running
statistics are buffers that the forward updates, before any check can run, as before.)

Where DeepSpeed does not make that check (ZeRO stage 0 without fp16, bf16 with
``check_grad_overflow: false``, ``compute_grad_norm: false``), the loss is checked before the
backward instead, at the cost of an all-reduce and a host sync per step; the log says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import all_ranks_agree


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; ``count`` includes the last one."""

    def __init__(self, message: str, count: NonFiniteCount):
        super().__init__(message)
        self.count = count


def deepspeed_skips_nonfinite(ds_config: dict[str, Any]) -> bool:
    """Does DeepSpeed's optimizer step skip an update whose gradient norm is inf or NaN?"""
    zero = ds_config.get("zero_optimization", {})
    if ds_config.get("fp16", {}).get("enabled"):
        return True  # the loss scaler's overflow check, at every stage
    if zero.get("stage", 0) == 0 or zero.get("compute_grad_norm", True) is False:
        return False
    bf16 = ds_config.get("bf16", {})
    return not (bf16.get("enabled") and bf16.get("check_grad_overflow", True) is False)


def guard_note(ds_config: dict[str, Any]) -> str:
    if deepspeed_skips_nonfinite(ds_config):
        return "non-finite check: in DeepSpeed's optimizer step (gradient norm), no added host sync"
    return (
        "non-finite check: the loss, before the backward (one added host sync per step: this DeepSpeed "
        "config does not skip non-finite gradients itself)"
    )


def loss_finite_everywhere(loss: torch.Tensor, device: torch.device) -> bool:
    """True only if ``loss`` is finite on every rank (a MIN all-reduce and a host sync)."""
    return all_ranks_agree(bool(torch.isfinite(loss.detach())), device)


@dataclass(frozen=True)
class NonFiniteCount:
    """Non-finite steps so far: in the whole run, and in a row up to the last step."""

    total: int = 0
    in_row: int = 0


@dataclass(frozen=True)
class NonFiniteGuard:
    """How a run counts the steps that every rank skipped: ``max_nonfinite`` in a row stop it.
    ``loss_scaled``: fp16 loss scaling, whose overflow skips steps of a finite loss."""

    max_nonfinite: int
    device: torch.device
    info: Callable[[str], None]
    loss_scaled: bool = False

    def record_skipped_step(
        self, count: NonFiniteCount, step: int, terms: dict[str, torch.Tensor], loss: torch.Tensor
    ) -> NonFiniteCount:
        """``count`` after the skipped ``step``; raise after ``max_nonfinite`` in a row.

        Every rank calls this for the same step (the skip decision was all-reduced), so the collective
        below and the stop are the same on every rank. With fp16 loss scaling, a skip whose loss was
        finite on every rank is the scaler's overflow (it lowers the scale and goes on): logged, not
        counted (DeepSpeed stops the run itself if the scale reaches its minimum).
        """
        values = {k: float(v.detach()) for k, v in terms.items()}  # the step is skipped: nothing left to overlap
        if self.loss_scaled and loss_finite_everywhere(loss, self.device):
            self.info(f"fp16 gradient overflow at step {step}: step skipped, loss scale lowered")
            return count
        count = NonFiniteCount(count.total + 1, count.in_row + 1)
        self.info(f"[yellow]non-finite loss or gradient at step {step}, step skipped on every rank[/yellow] ({values})")
        if count.in_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{count.in_row} non-finite steps in a row at step {step} "
                f"(train.max_nonfinite={self.max_nonfinite}); last terms: {values}",
                count,
            )
        return count
