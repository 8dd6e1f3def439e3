"""The ``torch`` backend: decode in DataLoader workers (or on the GPU), augment as batched device ops.

Workers only read and decode: a packed shard's sample (:class:`.shards.ShardDataset`) or a record
of the CPU loader's dataset, PIL-decoded and shrunk to about 1.15x the image size, and the batch
collated into one uint8 canvas (one copy to the device). With torchvision and CUDA, JPEGs from
shards travel as bytes instead and are decoded on the GPU in one batched
``torchvision.io.decode_jpeg(device="cuda")`` call (an image that fails there is replaced by another
of the batch and counted). The main process makes the views on the device with :mod:`.views`
(weak view; the two strong views only when asked), casts them to the training dtype, and applies
the MLM masking on the device.

Images of different sizes share one batch: each is placed at the top left of a canvas as large as
the largest (its last row and column repeated once, so bilinear sampling at its edge sees itself),
and its crop box is drawn from its own height and width, so the batched crop never reads the
padding. Sample order, rank split and last-batch policy are the CPU loader's
(:class:`.dataset.DistributedBatchSampler`: a permutation per ``(seed, epoch)``, global batches cut
into per-rank slices, the tail dropped so every rank has as many batches). View parameters come
from a generator seeded with ``(seed, epoch, indices of the batch)``: the same seed gives the same
batches. A sample that fails to load is replaced by the next good one and counted in ``skipped``.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .dataset import CaptionImageDataset, DistributedBatchSampler, Substitutes
from .decoding import decode_size
from .records import DataError
from .shards import ShardDataset, ShardSet, ids_to_tokens
from .spec import LoaderSpec, count_epoch_losses, merge_counts
from .views import VIEW_RECIPE, ViewRecipe, crop_boxes, crop_resize, normalize, strong_photometric

VIEW_STREAM = 1 << 31  # salt of the views' generator (per batch), apart from the masking's


def gpu_jpeg_decode_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ views on a device


def shrink_on_device(image: torch.Tensor, target: int) -> torch.Tensor:
    """``[C,H,W]`` uint8 with the short side shrunk to ``target`` (antialiased, rounded back to
    uint8 as PIL's shrink in the workers does); an image no larger is returned as it is."""
    h, w = image.shape[1:]
    if min(h, w) <= target:
        return image
    size = (max(1, round(h * target / min(h, w))), max(1, round(w * target / min(h, w))))
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return x.round_().clamp_(0, 255).to(torch.uint8)


def canvas(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[3,h,w]`` (or ``[1,h,w]``) images of one dtype -> ``([B,3,H,W], heights [B], widths [B])``
    (CPU size tensors). Workers build it in uint8, so a batch crosses to the GPU in one copy."""
    images = [x.expand(3, -1, -1) if x.shape[0] == 1 else x for x in images]
    hs = [int(x.shape[1]) for x in images]
    ws = [int(x.shape[2]) for x in images]
    if len(set(hs)) == 1 and len(set(ws)) == 1:
        return torch.stack(images), torch.tensor(hs, dtype=torch.float32), torch.tensor(ws, dtype=torch.float32)
    hmax, wmax = max(hs) + 1, max(ws) + 1
    out = images[0].new_zeros((len(images), 3, hmax, wmax))
    for i, x in enumerate(images):
        h, w = hs[i], ws[i]
        out[i, :, :h, :w] = x
        out[i, :, :h, w] = x[:, :, -1]  # one repeated column and row: bilinear sampling at the edge
        out[i, :, h, : w + 1] = out[i, :, h - 1, : w + 1]
    return out, torch.tensor(hs, dtype=torch.float32), torch.tensor(ws, dtype=torch.float32)


def make_views(
    x: torch.Tensor,
    hs: torch.Tensor,
    ws: torch.Tensor,
    size: int,
    generator: torch.Generator,
    strong: bool,
    recipe: ViewRecipe = VIEW_RECIPE,
) -> dict[str, torch.Tensor]:
    """The weak view (and the two strong views when ``strong``) of ``recipe`` of a float [0,1]
    :func:`canvas` ``x`` on any device, images ``hs`` x ``ws``, as one batched op each; normalised
    float32 ``[B,3,size,size]``."""
    # Every image sits at the canvas's top left, so a box in its own pixels is the same box on the
    # canvas; the random numbers come from a CPU generator (views' helpers move them to the device).
    out = {"image": normalize(crop_resize(x, crop_boxes(hs, ws, recipe.weak_scale, recipe.ratio, generator), size))}
    if strong:
        for key in ("image_a", "image_b"):
            boxes = crop_boxes(hs, ws, recipe.strong_scale, recipe.ratio, generator)
            flip = torch.rand(x.shape[0], generator=generator) < recipe.p_flip
            out[key] = normalize(strong_photometric(crop_resize(x, boxes, size, flip), generator, recipe))
    return out


# --------------------------------------------------------------------------------- CPU-side items


class _Items(Dataset):
    """Index -> ``{"index", "ids" | "row", "image" | "jpeg", "skipped"}``, bad samples substituted
    by the next good one and counted by the reason they failed."""

    def __init__(self, source, image_size: int, raw_jpeg: bool):
        self.source = source
        self.shards = ShardDataset(source, decode_size(image_size), raw_jpeg) if isinstance(source, ShardSet) else None
        self.load = Substitutes(len(source), self._load)

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, j: int) -> dict:
        if self.shards is not None:
            return self.shards[j]
        base: CaptionImageDataset = self.source
        return {"index": j, "image": np.asarray(base.load_image(j)), "row": j}

    def __getitem__(self, i: int) -> dict:
        _, sample, skipped = self.load(i)
        sample["skipped"] = skipped
        return sample


def _collate(samples: list[dict]) -> dict:
    batch = {"index": torch.tensor([s["index"] for s in samples], dtype=torch.int64), "images": [], "jpegs": {}}
    for k, s in enumerate(samples):
        if "jpeg" in s:
            batch["jpegs"][k] = torch.from_numpy(s["jpeg"].copy())
            batch["images"].append(None)
        else:
            img = np.asarray(s["image"])
            if img.ndim == 2:
                img = img[:, :, None]
            if not (img.flags.writeable and img.flags.c_contiguous):  # PIL's arrays are read-only views
                img = np.array(img)
            batch["images"].append(torch.from_numpy(img).permute(2, 0, 1))
    if not batch["jpegs"]:  # all decoded here: one uint8 canvas, one copy to the device
        batch["canvas"] = canvas(batch.pop("images"))
    if "ids" in samples[0]:
        batch["ids"] = [s["ids"] for s in samples]
    else:
        batch["rows"] = [s["row"] for s in samples]
    batch["skipped"] = merge_counts(*(s["skipped"] for s in samples))
    return batch


# ------------------------------------------------------------------------------------- the loader


class TorchLoader:
    """The ``torch`` backend: an epoch's batches on one rank, tensors on ``spec.device``, images in
    ``spec.dtype``. ``source``: a :class:`.shards.ShardSet` or the trainer's dataset.
    ``jpeg_on_device``: decode shards' JPEGs with nvJPEG (default: where torchvision and CUDA are)."""

    name = "torch"

    def __init__(self, source, spec: LoaderSpec, jpeg_on_device: bool | None = None):
        self.source, self.spec = source, spec
        if jpeg_on_device is None:
            jpeg_on_device = gpu_jpeg_decode_available(spec.device)
        from_shards = isinstance(source, ShardSet)
        self.gpu_decode = from_shards and jpeg_on_device
        self.sampler = DistributedBatchSampler.for_spec(len(source), spec)
        self.lost = source.epoch_skipped if from_shards else {}
        self.loader = DataLoader(
            _Items(source, spec.image_size, self.gpu_decode),
            batch_sampler=self.sampler,
            collate_fn=_collate,
            num_workers=spec.num_workers,
            pin_memory=spec.device.type == "cuda",
            prefetch_factor=4 if spec.num_workers > 0 else None,
            persistent_workers=False,
        )
        decode = "GPU nvJPEG (torchvision)" if self.gpu_decode else "PIL in workers"
        self.description = (
            f"torch backend: {decode} decode, views on {spec.device.type} "
            f"({'packed shards ' + str(source.root) if from_shards else 'records'})"
            + (
                f"; skipped when verifying the shards: {source.damage_note()}"
                if from_shards and source.damage_note()
                else ""
            )
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # The DataLoader's iterator (which draws the workers' base seed from torch's global RNG) is
        # made here, not on the first next(): the trainer makes it under fork_rng.
        cpu_batches = iter(self.loader)
        return count_epoch_losses(map(self._to_device, cpu_batches), self.spec, self.lost)

    def _decode(self, cpu_batch: dict) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], collections.Counter]:
        """The batch's float [0,1] canvas on the device (images about 1.15x the image size)."""
        if "canvas" in cpu_batch:
            x, hs, ws = cpu_batch["canvas"]
            return (x.to(self.spec.device, non_blocking=True).float().div_(255), hs, ws), collections.Counter()
        device = self.spec.device
        target = decode_size(self.spec.image_size)
        images = [None if x is None else x.to(device, non_blocking=True) for x in cpu_batch["images"]]
        failed = collections.Counter()
        jpegs = cpu_batch["jpegs"]
        if jpegs:
            from torchvision.io import ImageReadMode, decode_jpeg

            keys = list(jpegs)
            try:
                decoded = decode_jpeg([jpegs[k] for k in keys], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad JPEG fails the batched call: decode one by one
                decoded = []
                for k in keys:
                    try:
                        decoded.append(decode_jpeg(jpegs[k], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        decoded.append(None)
                        failed["undecodable_image"] += 1
            for k, img in zip(keys, decoded):
                images[k] = img
        good = [x for x in images if x is not None]
        if not good:
            raise DataError("every image of a batch failed to decode on the GPU")
        images = [x if x is not None else good[0] for x in images]  # substitute a good one of the batch
        x, hs, ws = canvas([shrink_on_device(x, target) for x in images])  # uint8: one conversion below
        return (x.float().div_(255), hs, ws), failed

    def _to_device(self, cpu_batch: dict) -> dict:
        spec, device = self.spec, self.spec.device
        index = cpu_batch["index"]
        (x, hs, ws), failed = self._decode(cpu_batch)
        g = spec.generator(VIEW_STREAM, *index.tolist())
        views = make_views(x, hs, ws, spec.image_size, g, spec.strong_views, spec.views)
        batch = {k: v.to(spec.dtype) for k, v in views.items()}
        if "ids" in cpu_batch:
            ids, mask = ids_to_tokens(cpu_batch["ids"], self.source.context_length, self.source.pad_token_id)
            ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        else:
            rows = cpu_batch["rows"]
            ids = torch.from_numpy(self.source.input_ids[rows]).long()
            mask = torch.from_numpy(self.source.attention_mask[rows]).long()
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        batch.update(spec.mask_captions(ids, mask, index))
        batch.update(index=index.to(device, non_blocking=True), skipped=merge_counts(cpu_batch["skipped"], failed))
        return batch
