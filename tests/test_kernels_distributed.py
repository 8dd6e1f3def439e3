"""Two ranks over gloo, as the objective runs them: each rank's local rows against the columns
all-gathered with gradients (torch.distributed.nn.functional.all_gather), against one process
holding the whole batch.

The per-rank loss is the mean over its own rows and the gather's backward sums the column
gradients of all ranks, so each rank's features receive world_size times the single-process
gradient; DeepSpeed's averaging across ranks then divides by world_size. The test checks exactly
that: (grad on rank r) / world == single-process grad of rank r's rows, for every input, and the
rank-averaged loss and logit-scale gradient equal the single-process ones.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .helpers import spawn_ranks

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = [pytest.mark.slow, pytest.mark.interpreter]

WORLD, B, D = 2, 5, 12


def _batch(n_sets: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1) for _ in range(n_sets)]


def _gather(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _call(ops, op: str, local: list[torch.Tensor], gathered: list[torch.Tensor], scale, offset: int):
    if op == "infonce":
        return ops.infonce(local[0], local[1], scale, gathered[0], gathered[1], offset)
    if op == "ntxent":
        return ops.ntxent(local[0], local[1], 0.2, gathered[0], gathered[1], offset)
    # itc: (img, txt), (img_fp, txt), (img, txt_fp) with img, img_fp, txt, txt_fp = sets 0..3
    img, img_fp, txt, txt_fp = local
    img_all, img_fp_all, txt_all, txt_fp_all = gathered
    losses = ops.itc_terms(
        [img, img_fp, img],
        [txt, txt, txt_fp],
        scale,
        [img_all, img_fp_all, img_all],
        [txt_all, txt_all, txt_fp_all],
        offset,
    )
    return (losses * torch.tensor([0.3, 0.5, 0.7])).sum()


def _single_process(ops, op: str, n_sets: int):
    leaves = [x.clone().requires_grad_() for x in _batch(n_sets)]
    scale = torch.tensor([30.0], requires_grad=True)
    loss = _call(ops, op, leaves, leaves, scale, 0)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves], _grad_or_zero(scale)


def _grad_or_zero(scale: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(scale) if scale.grad is None else scale.grad.clone()  # NT-Xent has a fixed tau


def _rank_main(rank: int, world: int, init_file: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from unimlip_fast.kernels.ops import REFERENCE_OPS, triton_ops

    rows = slice(rank * B, (rank + 1) * B)
    try:
        for ops in (triton_ops(), REFERENCE_OPS):
            for op, n_sets in (("infonce", 2), ("ntxent", 2), ("itc", 4)):
                local = [x[rows].clone().requires_grad_() for x in _batch(n_sets)]
                scale = torch.tensor([30.0], requires_grad=True)
                loss = _call(ops, op, local, [_gather(x) for x in local], scale, rank * B)
                loss.backward()
                mean_loss, mean_dscale = loss.detach().clone(), _grad_or_zero(scale)
                dist.all_reduce(mean_loss)
                dist.all_reduce(mean_dscale)

                want_loss, want_grads, want_dscale = _single_process(REFERENCE_OPS, op, n_sets)
                where = f"{ops.name} {op} rank {rank}"
                torch.testing.assert_close(mean_loss / WORLD, want_loss, rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(mean_dscale / WORLD, want_dscale, rtol=1e-5, atol=1e-6, msg=where)
                for i, (x, want) in enumerate(zip(local, want_grads)):
                    torch.testing.assert_close(
                        x.grad / WORLD,
                        want[rows],
                        rtol=1e-5,
                        atol=1e-6,
                        msg=lambda m, i=i, where=where: f"{where} input {i}: {m}",
                    )
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    spawn_ranks(_rank_main, WORLD, str(tmp_path / "init"))
