"""The ``cpu`` backend: PIL decode and views in DataLoader workers; the evaluation loader and the
evaluation transform of one image (:func:`eval_image`).

Each sample is decoded (:mod:`.decoding`, shrunk early) and its views made one image at a time by
:mod:`.views`' single-image wrappers, seeded by ``(seed, epoch, index)``; the collate stacks them
and masks the captions of the whole batch at once (:meth:`.spec.LoaderSpec.mask_captions`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .dataset import CaptionImageDataset, DistributedBatchSampler, Substitutes
from .decoding import decode_image, decode_image_bytes, decode_size, fit_image
from .spec import LoaderSpec, merge_counts
from .views import eval_view_one, strong_views_one, weak_view_one


class _ViewDataset(Dataset):
    """The dataset as one loader sees it: views, per-sample seeds, substitution of bad samples.
    ``spec`` None: the eval view."""

    def __init__(self, base: CaptionImageDataset, spec: LoaderSpec | None):
        self.base, self.spec = base, spec
        self.load = Substitutes(len(base), base.load_image, lambda i: repr(base.records[i].image))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        # Per-sample ops are tiny: intra-op threads only add overhead (workers already run with one
        # thread; in the main process, num_workers=0, drop to one for the sample and restore).
        threads = torch.get_num_threads()
        if threads == 1 or get_worker_info() is not None:
            return self._sample(i)
        torch.set_num_threads(1)
        try:
            return self._sample(i)
        finally:
            torch.set_num_threads(threads)

    def _sample(self, i: int) -> dict:
        j, image, skipped = self.load(i)
        sample = {
            "index": j,
            "input_ids": self.base.input_ids[j],
            "attention_mask": self.base.attention_mask[j],
            "skipped": skipped,
        }
        spec = self.spec
        if spec is None:
            sample["image"] = eval_view_one(image, self.base.image_size)
            return sample
        g = spec.generator(j)
        sample["image"] = weak_view_one(image, spec.image_size, g, spec.views.weak_scale, spec.views.ratio)
        if spec.strong_views:
            sample["image_a"], sample["image_b"] = strong_views_one(image, spec.image_size, g, spec.views)
        return sample


class _Collate:
    """Stacks samples into the batch contract; masks the captions of the whole batch at once."""

    def __init__(self, spec: LoaderSpec | None):
        self.spec = spec

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict = {"index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}
        for key in ("image", "image_a", "image_b"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        ids = torch.from_numpy(np.stack([s["input_ids"] for s in samples])).long()
        mask = torch.from_numpy(np.stack([s["attention_mask"] for s in samples])).long()
        if self.spec is None:
            batch.update(input_ids=ids, attention_mask=mask)
        else:
            batch.update(self.spec.mask_captions(ids, mask, batch["index"]))
        batch["skipped"] = merge_counts(*(s["skipped"] for s in samples))
        return batch


def _data_loader(view_ds, batch_sampler, collate, num_workers: int) -> DataLoader:
    return DataLoader(
        view_ds,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers > 0 else None,
    )


class CPULoader:
    """The ``cpu`` backend: an epoch's batches on one rank (see :class:`.dataset.DistributedBatchSampler`)."""

    name = "cpu"

    def __init__(self, source: CaptionImageDataset, spec: LoaderSpec):
        self.spec = spec
        self.sampler = DistributedBatchSampler.for_spec(len(source), spec)
        self.loader = _data_loader(_ViewDataset(source, spec), self.sampler, _Collate(spec), spec.num_workers)
        where = (
            "the training process"
            if spec.num_workers == 0
            else f"{spec.num_workers} worker{'s' if spec.num_workers > 1 else ''}"
        )
        self.description = f"cpu backend: PIL decode and views in {where}"

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)


def build_eval_loader(dataset: CaptionImageDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Every sample once, in order, with the eval view and unmasked captions (last batch may be short)."""
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in range(0, len(dataset), batch_size)]
    return _data_loader(_ViewDataset(dataset, None), batches, _Collate(None), num_workers)


def eval_image(image, image_size: int) -> torch.Tensor:
    """The evaluation transform of one image (a path, a PIL image or an encoded file's bytes) ->
    normalised ``[3,S,S]``: the same decode and eval view as an eval loader's batch."""
    target = decode_size(image_size)
    if isinstance(image, Image.Image):
        array = fit_image(image, target)
    elif isinstance(image, bytes):
        array = decode_image_bytes(image, target)
    else:
        array = decode_image(str(image), target)
    return eval_view_one(array, image_size)
