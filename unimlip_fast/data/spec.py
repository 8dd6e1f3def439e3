"""What every training backend is given (:class:`LoaderSpec`) and what it yields (the batch).

Every backend is ``Backend(source, spec)``: ``source`` is the trainer's
:class:`.dataset.CaptionImageDataset` or a packed :class:`.shards.ShardSet`; ``spec`` is built once
per run (:func:`loader_spec`) and specialised per epoch and phase with
:meth:`LoaderSpec.for_epoch`. A backend is iterable (one epoch's batches on one rank), has
``len`` (batches left in the epoch) and a ``description``.

A batch (per rank, ``B`` samples) is a dict:

- ``image`` [B,3,H,W]: the weak view (the eval view in an eval loader);
- ``image_a``, ``image_b`` [B,3,H,W]: two strong views, only when ``spec.strong_views``;
- ``input_ids``, ``attention_mask`` [B,L] int64: the caption, MLM-masked when ``spec.mlm`` is set;
- ``mlm_labels`` [B,L] int64 (-100 where not masked): only when ``spec.mlm`` is set;
- ``index`` [B] int64: the dataset (record) index of each sample actually used;
- ``skipped``: ``{reason: count}`` of samples lost in this batch: a sample that fails to load is
  replaced by the next good one, so every batch keeps its size (ranks all-gather equal sizes).

The CPU backend's images are float32 on the CPU; the GPU backends' tensors are already on
``spec.device`` and their images in ``spec.dtype``. All randomness (sample order, views, masking)
comes from ``(seed, epoch, sample indices)``, so a batch does not depend on the number of workers,
and a run resumed with ``skip_batches`` sees the batches it would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .masking import MaskingTables, mask_tokens
from .records import DataError
from .views import VIEW_RECIPE, ViewRecipe

MLM_STREAM = 1 << 30  # salt of the masking generator, apart from the views' streams


@dataclass(frozen=True)
class LoaderSpec:
    """How one rank loads: the run's constants, plus the epoch, phase and resume point
    (:meth:`for_epoch`)."""

    batch_size: int  # per rank
    image_size: int  # side of the square views
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    views: ViewRecipe = VIEW_RECIPE  # the views' parameters, crop areas from data.weak_scale / data.strong_scale
    num_workers: int = 0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # of the GPU backends' images
    mlm: MaskingTables | None = None  # None: captions unmasked, no mlm_labels
    mlm_prob: float = 0.15
    epoch: int = 0
    strong_views: bool = False  # the SimCLR phase
    skip_batches: int = 0  # batches of this epoch already trained on (resume)

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    def for_epoch(self, epoch: int, strong_views: bool, skip: int = 0) -> LoaderSpec:
        """This spec for one epoch and phase, resuming after ``skip`` batches."""
        return dataclasses.replace(self, epoch=epoch, strong_views=strong_views, skip_batches=skip)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self, n: int) -> int:
        """Full global batches ``n`` samples give each rank (before skipping); none is an error."""
        return batches_per_epoch(n, self.batch_size, self.world_size)

    def generator(self, *entropy: int) -> torch.Generator:
        """A CPU generator seeded from ``(seed, epoch, *entropy)``."""
        return seeded_generator(self.seed, self.epoch, *entropy)

    def mask_captions(self, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"[, "mlm_labels"]}``: the captions of the samples
        ``index``, MLM-masked when the spec says so (seeded by the epoch and the indices)."""
        if self.mlm is None:
            return {"input_ids": ids, "attention_mask": mask}
        g = self.generator(MLM_STREAM, *index.tolist())
        masked, labels = mask_tokens(ids, mask, self.mlm, self.mlm_prob, g)
        return {"input_ids": masked, "attention_mask": mask, "mlm_labels": labels}


def loader_spec(cfg, rank: int, world_size: int, device, dtype: torch.dtype, mlm: MaskingTables | None) -> LoaderSpec:
    """The run's spec from its config (``cfg``: the whole :class:`~unimlip_fast.config.Config`)."""
    return LoaderSpec(
        batch_size=cfg.train.batch_size // world_size,
        image_size=cfg.model.image_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        views=VIEW_RECIPE.with_scales(cfg.data.weak_scale, cfg.data.strong_scale),
        num_workers=cfg.data.num_workers,
        device=device,
        dtype=dtype,
        mlm=mlm,
        mlm_prob=cfg.loss.mlm_prob,
    )


def batches_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Full global batches of ``batch_size`` x ``world_size`` in ``n`` samples; none is an error."""
    batches = n // (batch_size * world_size)
    if batches == 0:
        raise DataError(
            f"{n} samples do not fill one global batch of {batch_size} x {world_size} ranks; lower train.batch_size"
        )
    return batches


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from any number of integers (numpy's SeedSequence)."""
    seed = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    """``{reason: count}`` dicts added up."""
    total: collections.Counter = collections.Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def count_epoch_losses(batches: Iterable[dict], spec: LoaderSpec, lost: dict[str, int]) -> Iterator[dict]:
    """``batches`` with ``lost`` (samples an epoch loses before any batch is made, e.g. those a
    packed folder dropped) added to the first batch's ``skipped``: once per epoch, on rank 0, and
    not again when the epoch is resumed mid-way."""
    pending = lost if spec.rank == 0 and spec.skip_batches == 0 else {}
    for batch in batches:
        if pending:
            batch["skipped"], pending = merge_counts(batch["skipped"], pending), {}
        yield batch


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the caption columns to the longest caption in the batch. Only for batches still on the
    CPU (the CPU loader's): on the device, finding the longest would cost a host sync per step."""
    if batch["attention_mask"].device.type != "cpu":
        return batch
    longest = int(batch["attention_mask"].sum(dim=1).max())
    for key in ("input_ids", "attention_mask", "mlm_labels"):
        if key in batch:
            batch[key] = batch[key][:, :longest]
    return batch
