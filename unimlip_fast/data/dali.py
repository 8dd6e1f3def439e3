"""The ``dali`` backend (optional dependency): packed shards -> the batch, decoded and augmented on the GPU.

Install: ``pip install 'unimlip-fast[dali]'`` (``nvidia-dali-cuda130``, CUDA 13 drivers); on a
CUDA 12 driver ``pip install nvidia-dali-cuda120`` instead. The same wheels run the CPU operators.

One pipeline per epoch and phase (the trainer builds a loader per epoch and per phase):

- ``fn.readers.webdataset`` over the shards with their *verified* indices (:mod:`.shards`: a
  sample that failed verification is not in the index, so DALI never reads it), sharded by rank
  (``shard_id``/``num_shards``), shuffled with a seed drawn from ``(seed, epoch)``
  (``random_shuffle``, a buffer of ``initial_fill`` samples) after the tars themselves are put in
  an order drawn from ``(seed, epoch)``, the same on every rank (packing already spread the
  records over the shards in a shuffled order). Last batch: each rank
  stops after ``(samples // ranks) // batch`` batches, the same count on every rank; the rest of
  the epoch is dropped (``LastBatchPolicy.DROP``).
- one decode per sample: ``fn.decoders.image`` on the GPU (``device="mixed"``, nvJPEG), or on the
  CPU when the pipeline has ``device_id=None`` (how the tests run it, the same definition);
- from that decoded image, the views of the spec's :class:`.views.ViewRecipe`: the weak view
  (random resized crop, area ``weak_scale``) and, only in the SimCLR phase, two strong views: crop
  area ``strong_scale``; colour jitter (hue in degrees: 360 x the recipe's fraction of the circle)
  and greyscale folded into one ``fn.color_twist`` (saturation 0 is grey); Gaussian blur (sigma
  1e-3 when off: an identity kernel, its window sized for the largest sigma); horizontal flip; each view normalised with
  the CLIP mean/std by ``fn.crop_mirror_normalize``, NCHW, float16 when training in fp16, float32
  otherwise (cast to bf16 on the device after the iterator: DALI has no bf16).
- captions: the ``.ids`` member read as int32, padded to the context length by ``fn.pad``, its
  length (the attention length) taken from its shape; ``.idx`` gives the batch's ``index``.

The colour ops are DALI's, not :mod:`.views`': DALI's contrast pivots on mid-grey rather than the
image mean and its colour twist is applied as one linear map, so strong views match the recipe in
distribution, not pixel for pixel. MLM masking runs on the torch side, after the iterator
(:func:`.masking.mask_tokens` on the device).

Undecodable images: DALI stops the pipeline on an image it cannot decode, so such images never
reach it: packing decode-checks every image and skips the bad ones, and a shard changed after
packing is re-verified when opened; the samples dropped either way are counted in the first
batch's ``skipped`` of each epoch (rank 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .shard_format import IMAGE_EXTS
from .shards import ShardSet
from .spec import LoaderSpec, count_epoch_losses
from .views import CLIP_MEAN, CLIP_STD, ViewRecipe


def blur_window(max_sigma: float) -> int:
    """The Gaussian window that holds +-3 sigma: ``2 * ceil(3 * max_sigma) + 1`` (13 for sigma up to 2)."""
    return 2 * math.ceil(3 * max_sigma) + 1


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, 7]).generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def build_pipeline(
    shards: ShardSet,
    spec: LoaderSpec,
    device_id: int | None = 0,
    shard_order=None,
    initial_fill: int = 4096,
    prefetch: int = 2,
):
    """The DALI pipeline (not yet built) of one rank, epoch and phase of ``spec``; outputs
    ``image[, image_a, image_b], ids, length, index``. ``shard_order`` permutes the tars (the same on
    every rank, so the ranks' parts stay disjoint)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    out_type = types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT
    recipe: ViewRecipe = spec.views
    image_size, seed = spec.image_size, _epoch_seed(spec.seed, spec.epoch, spec.rank)
    ratio = list(recipe.ratio)
    mean = [255 * m for m in CLIP_MEAN]
    std = [255 * s for s in CLIP_STD]
    length = shards.context_length
    order = list(range(len(shards.tars))) if shard_order is None else [int(k) for k in shard_order]

    def normalise(x, mirror=None):
        kwargs = {"mirror": mirror} if mirror is not None else {}
        return fn.crop_mirror_normalize(x, dtype=out_type, output_layout="CHW", mean=mean, std=std, **kwargs)

    def uniform(lo, hi):
        return fn.random.uniform(range=[lo, hi])

    def coin(p):  # 1.0 with probability p, else 0.0
        return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)

    def jitter(on, amount):  # a factor in 1 +- amount when ``on`` is 1, else 1
        return 1.0 + on * uniform(-amount, amount)

    def strong_view(images):
        x = fn.random_resized_crop(
            images, size=[image_size, image_size], random_area=list(recipe.strong_scale), random_aspect_ratio=ratio
        )
        on = coin(recipe.p_jitter)
        keep = 1.0 - coin(recipe.p_grey)  # 0: greyscale
        bj, cj, sj, hj = recipe.jitter
        x = fn.color_twist(
            x,
            brightness=jitter(on, bj),
            contrast=jitter(on, cj),
            saturation=jitter(on, sj) * keep,
            hue=on * uniform(-360.0 * hj, 360.0 * hj),
        )
        blur = coin(recipe.p_blur)
        sigma = blur * uniform(*recipe.blur_sigma) + (1.0 - blur) * 1e-3
        x = fn.gaussian_blur(x, sigma=sigma, window_size=blur_window(recipe.blur_sigma[1]))
        return normalise(x, mirror=fn.random.coin_flip(probability=recipe.p_flip))

    @pipeline_def(
        batch_size=spec.batch_size,
        num_threads=max(1, spec.num_workers),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
    )
    def pipeline():
        encoded, ids, index = fn.readers.webdataset(
            paths=[str(shards.tars[k]) for k in order],
            index_paths=[str(shards.indices[k]) for k in order],
            ext=[";".join(IMAGE_EXTS), "ids", "idx"],
            dtypes=[types.UINT8, types.INT32, types.INT64],
            missing_component_behavior="error",
            shard_id=spec.rank,
            num_shards=spec.world_size,
            random_shuffle=True,
            initial_fill=max(1, min(initial_fill, len(shards))),
            seed=seed,
            pad_last_batch=False,
            name="reader",
        )
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        weak = normalise(
            fn.random_resized_crop(
                images, size=[image_size, image_size], random_area=list(recipe.weak_scale), random_aspect_ratio=ratio
            )
        )
        lengths = ids.shape(dtype=types.INT32)
        padded = fn.pad(ids, fill_value=shards.pad_token_id, shape=[length])
        if spec.strong_views:
            return weak, strong_view(images), strong_view(images), padded, lengths, index
        return weak, padded, lengths, index

    return pipeline()


class DALILoader:
    """The ``dali`` backend: an epoch's batches on one rank (tensors on ``spec.device``; a CPU
    device runs the same pipeline with DALI's CPU operators)."""

    name = "dali"

    def __init__(self, source: ShardSet, spec: LoaderSpec):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.source, self.spec = source, spec
        device_id = None if spec.device.type == "cpu" else (spec.device.index or 0)
        self.num_batches = spec.batches_per_epoch(len(source))
        shard_order = np.random.default_rng([spec.seed, spec.epoch]).permutation(len(source.tars))  # rank-free
        pipe = build_pipeline(source, spec, device_id, shard_order=shard_order)
        pipe.build()
        self.keys = ["image"] + (["image_a", "image_b"] if spec.strong_views else []) + ["ids", "length", "index"]
        self.iterator = DALIGenericIterator(
            [pipe], self.keys, reader_name="reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=False
        )
        where = "GPU (mixed nvJPEG decode)" if device_id is not None else "CPU operators (device_id=None)"
        self.description = f"dali backend: {where}, shards {source.root}" + (
            f"; skipped when verifying the shards: {source.damage_note()}" if source.damage_note() else ""
        )

    def __len__(self) -> int:
        return max(0, self.num_batches - self.spec.skip_batches)

    def __iter__(self):
        return count_epoch_losses(self._batches(), self.spec, self.source.epoch_skipped)

    def _batches(self):
        for k, out in enumerate(self.iterator):
            if k >= self.num_batches:
                break
            if k < self.spec.skip_batches:  # resuming mid-epoch: the batches already trained on
                continue
            yield self._contract(out[0])

    def _contract(self, out: dict) -> dict:
        device = self.spec.device
        index = out["index"].view(-1).to(torch.int64)
        lengths = out["length"].view(-1).to(device)
        ids = out["ids"].to(device, torch.int64, non_blocking=True)
        positions = torch.arange(ids.shape[1], device=device)
        mask = (positions[None, :] < lengths[:, None]).to(torch.int64)
        batch = {key: out[key].to(device).to(self.spec.dtype) for key in ("image", "image_a", "image_b") if key in out}
        batch.update(self.spec.mask_captions(ids, mask, index))
        batch.update(index=index.to(device), skipped={})
        return batch
