"""What DeepSpeed does not keep equal across ranks, or in its own copies, made so by hand.

- BatchNorm running statistics are buffers: DeepSpeed broadcasts parameters, not buffers, and a
  checkpoint stores rank 0's. ``average_batchnorm_stats`` averages them over the ranks where they
  must agree: when the statistics freeze (from then on every rank normalises with the same
  numbers), and before a checkpoint or an export (what is saved is what every rank holds).
- A clamped parameter (the logit scale) is clamped in place after the optimizer step, as open_clip
  does, so the forward pass never cuts its gradient. Under ZeRO the optimizer steps an fp32 master
  copy (a partition of it), not the module's tensor; ``clamp_parameter_`` clamps both, or the next
  step would copy the unclamped master back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> int:
    """Running mean and variance of every BatchNorm in ``module`` averaged over the ranks, in place;
    ``num_batches_tracked`` set to the largest. A collective: every rank must call it. Returns how
    many BatchNorm layers it touched."""
    layers = [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    if _world_size() == 1 or not layers:
        return len(layers)
    stats = [buf for m in layers for buf in (m.running_mean, m.running_var)]
    flat = torch.cat([s.float().flatten() for s in stats])
    dist.all_reduce(flat)
    flat /= _world_size()
    for buf, value in zip(stats, flat.split([s.numel() for s in stats])):
        buf.copy_(value.view_as(buf))
    counts = torch.stack([m.num_batches_tracked for m in layers])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    for m, count in zip(layers, counts):
        m.num_batches_tracked.copy_(count)
    return len(layers)


@torch.no_grad()
def clamp_parameter_(param: nn.Parameter, low: float, high: float) -> None:
    """``low <= param <= high`` in the module and in DeepSpeed's fp32 master copy (ZeRO-1/2/3, and
    the bf16 optimizer). A collective under ZeRO: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    master = safe_get_full_fp32_param(param)  # None where no optimizer keeps a separate copy
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(low, high))
    if hasattr(param, "ds_id") and not getattr(param, "ds_persist", False):
        # ZeRO-3 partitions the working copy: gather, clamp, re-partition. (A small parameter such as
        # the logit scale is usually persistent, whole on every rank, and must stay so.)
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.clamp_(low, high)
    else:
        param.data.clamp_(low, high)
