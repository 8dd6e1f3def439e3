"""Contrastive-exact gradient accumulation: a global batch larger than the devices hold at once.

The contrastive terms are losses over the whole global batch, so accumulating the gradients of
per-micro-batch losses would shrink their negatives. Instead (GradCache, Gao et al. 2021; open_clip's
``--accum-freq``), a rank's batch is cut into K micro-batches of ``train.micro_batch_size`` and one
step runs in three phases:

1. every micro-batch forward without autograd, keeping the features the objective needs and the
   random state the forward started from (the CPU and device generators: dropout, BERT's dropout,
   DropBlock's noise or its Philox seed; augmentation and MLM masking are already in the batch);
2. the five terms over the whole batch's features (gathered across ranks, as without accumulation)
   and the gradient of the contrastive part of the loss with respect to those features, which are
   leaf tensors here;
3. each micro-batch forward again from its random state, and a backward through DeepSpeed of
   ``sum(features * their cached gradient)`` plus the micro-batch's own share of the MLM term;
   DeepSpeed accumulates (``gradient_accumulation_steps`` = K) and steps once.

The MLM term is a mean over the rank's masked tokens, so each micro-batch contributes its summed
cross-entropy divided by the rank's token count. Phase 1 runs the fusion head too: the step's five
terms are known before any backward, for the log and the non-finite check.

What is not exact: BatchNorm in training mode (the warm-up phase; the SimCLR head) normalises each
micro-batch with its own statistics, and DropBlock normalises by the kept fraction of the
micro-batch's map, as a smaller per-device batch would. Running statistics move once per
micro-batch: phase 1's updates are undone. With the image encoder's statistics frozen (the SimCLR
phase) and the head's in eval mode, the step is the whole batch's, to rounding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError
from ..kernels.ops import LossOps
from ..objective import compute_terms, mlm_loss, total_loss

# Features that belong to one micro-batch's own term (MLM), not to the global-batch objective.
MICRO_BATCH_FEATURES = ("mlm_logits", "mlm_targets")


def micro_batch_plan(batch_size: int, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) for ``train.batch_size`` over ``world_size`` ranks;
    ``micro_batch_size`` 0 means the whole per-rank batch (no accumulation)."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {world_size} ranks")
    per_rank = batch_size // world_size
    micro = micro_batch_size or per_rank
    if micro > per_rank or per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} must divide the per-rank batch of {per_rank} "
            f"(train.batch_size={batch_size} over {world_size} ranks)"
        )
    return micro, per_rank // micro


@dataclass
class _RandomState:
    cpu: torch.Tensor
    device: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        on_cuda = device.type == "cuda"
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.device, device)


@dataclass
class _Cached:
    """What phase 1 and 2 leave for phase 3."""

    phase: str
    micro_batches: list[dict[str, torch.Tensor]]
    randomness: list[_RandomState]
    after_first_pass: _RandomState
    feature_grads: list[dict[str, torch.Tensor]]  # per micro-batch: d(contrastive loss)/d(feature)
    scale_grad: torch.Tensor | None  # d(contrastive loss)/d(logit scale)
    mlm_tokens: torch.Tensor | None  # the rank's masked tokens (the MLM mean's denominator)


class _Stopwatch:
    """Seconds of a repeated stretch of work, without a host sync: CUDA events, read at ``total``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[Any] = []
        self._open: Any = None

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self._open, end))
        else:
            self.spans.append(time.perf_counter() - self._open)

    def total(self) -> float:
        """Seconds over every span since the last call (syncs on the last CUDA event)."""
        if self.cuda and self.spans:
            self.spans[-1][1].synchronize()
            seconds = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        else:
            seconds = sum(self.spans)
        self.spans = []
        return seconds


class GradientAccumulator:
    """One optimizer step over a rank's batch, in micro-batches; see the module docstring.

    ``forward(batch, phase)`` runs phases 1 and 2 and returns the terms and the total loss (values,
    as the whole batch's); ``backward()`` runs phase 3, calling ``engine.step()`` between
    micro-batches and leaving the last one, the optimizer step, to the caller, as after
    ``engine.backward(loss)``.
    """

    def __init__(
        self, engine, cfg: Config, ops: LossOps, micro_batch_size: int, device: torch.device, world_size: int = 1
    ):
        self.engine, self.cfg, self.ops, self.device = engine, cfg, ops, device
        self.micro_batch_size = micro_batch_size
        self.global_batch = cfg.train.batch_size
        self.world_size = world_size
        self._cached: _Cached | None = None
        self._first_pass, self._rest = _Stopwatch(device), _Stopwatch(device)  # phase 1; phases 2 and 3
        self._steps = 0

    # --- phases 1 and 2 --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], phase: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self._steps += 1
        self._first_pass.start()
        micro_batches = split_batch(batch, self.micro_batch_size)
        randomness, kept, mlm_sums, scale = [], [], [], None
        with torch.no_grad(), running_statistics_kept(self.engine.module):
            for micro in micro_batches:
                randomness.append(_RandomState.capture(self.device))
                features = self.engine(micro, phase)
                scale = features.pop("logit_scale")
                if "mlm_logits" in features:
                    mlm_sums.append(mlm_loss(features["mlm_logits"], features["mlm_targets"], reduction="sum"))
                kept.append({k: v for k, v in features.items() if k not in MICRO_BATCH_FEATURES})
        after_first_pass = _RandomState.capture(self.device)
        self._first_pass.stop()
        self._rest.start()

        leaves = {name: torch.cat([f[name] for f in kept]).float().requires_grad_() for name in kept[0]}
        scale_leaf = scale.float().requires_grad_()
        with torch.enable_grad():
            terms = compute_terms({**leaves, "logit_scale": scale_leaf}, self.cfg.loss, self.ops)
            contrastive = total_loss(terms, self.cfg.loss)
            if isinstance(contrastive, torch.Tensor) and contrastive.requires_grad:
                # Every rank takes this backward: the gathered features' gradients are reduced here.
                contrastive.backward()
        terms = {name: value.detach() for name, value in terms.items()}
        mlm_tokens = None
        if mlm_sums and self.cfg.loss.mlm > 0:
            mlm_tokens = (batch["mlm_labels"] >= 0).sum()
            terms["mlm"] = torch.stack(mlm_sums).sum() / mlm_tokens.clamp_min(1)
        grads = {name: leaf.grad.split(self.micro_batch_size) for name, leaf in leaves.items() if leaf.grad is not None}
        self._cached = _Cached(
            phase,
            micro_batches,
            randomness,
            after_first_pass,
            [{name: g[k] for name, g in grads.items()} for k in range(len(micro_batches))],
            scale_leaf.grad,
            mlm_tokens,
        )
        return terms, total_loss(terms, self.cfg.loss)

    # --- phase 3 ---------------------------------------------------------------------------------
    def backward(self) -> None:
        cached, self._cached = self._cached, None
        if cached is None:
            raise RuntimeError("GradientAccumulator.backward() without a forward() before it")
        last = len(cached.micro_batches) - 1
        for k, micro in enumerate(cached.micro_batches):
            cached.randomness[k].restore(self.device)
            features = self.engine(micro, cached.phase)
            surrogate = sum((features[name].float() * grad).sum() for name, grad in cached.feature_grads[k].items())
            if k == 0 and cached.scale_grad is not None:  # the logit scale is one value: counted once
                surrogate = surrogate + (features["logit_scale"].float() * cached.scale_grad).sum()
            if cached.mlm_tokens is not None:
                share = mlm_loss(features["mlm_logits"], features["mlm_targets"], reduction="sum")
                surrogate = surrogate + self.cfg.loss.mlm * share / cached.mlm_tokens.clamp_min(1)
            # The cached gradients already are the whole batch's: no division by the K micro-batches.
            self.engine.backward(surrogate, scale_wrt_gas=False)
            if k < last:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-batch
        cached.after_first_pass.restore(self.device)
        self._rest.stop()

    # --- the log ---------------------------------------------------------------------------------
    def describe(self) -> str:
        k = self.global_batch // self.world_size // self.micro_batch_size
        return (
            f"gradient accumulation: {k} micro-batches of {self.micro_batch_size} per rank make the global batch "
            f"of {self.global_batch} (each micro-batch runs forward twice: first without autograd, "
            f"for the features)"
        )

    def flush(self) -> dict[str, float]:
        """The extra forward's cost since the last flush, beside the batch it buys."""
        first, steps = self._first_pass.total(), max(1, self._steps)
        whole = first + self._rest.total()  # a step skipped as non-finite has no phase 3
        self._steps = 0
        return {
            "accum/micro_batch": self.micro_batch_size,
            "accum/global_batch": self.global_batch,
            "accum/extra_forward_samples_per_s": self.global_batch * steps / first if first else float("nan"),
            "accum/extra_forward_s": first / steps,
            "accum/extra_forward_share": first / whole if whole else float("nan"),
        }


def build_accumulator(
    engine, cfg: Config, ops: LossOps, world_size: int, device: torch.device
) -> GradientAccumulator | None:
    """None when a rank's batch is one micro-batch (the step needs no accumulation)."""
    micro, steps = micro_batch_plan(cfg.train.batch_size, world_size, cfg.train.micro_batch_size)
    return GradientAccumulator(engine, cfg, ops, micro, device, world_size) if steps > 1 else None


def split_batch(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """A batch dict -> micro-batch dicts of ``size`` rows (views, no copies)."""
    pieces = {key: value.split(size) for key, value in batch.items()}
    return [{key: parts[i] for key, parts in pieces.items()} for i in range(len(next(iter(pieces.values()))))]


@contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Undo, on exit, what forwards inside did to BatchNorm's running statistics (phase 1's pass
    must not move them a second time)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{name: b.clone() for name, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
