"""The CPU loader: records -> batches of the design's batch contract.

A batch (per rank, ``B`` samples) is a dict:

- ``image`` [B,3,H,W] float32: the weak view (the eval view in an eval loader);
- ``image_a``, ``image_b`` [B,3,H,W] float32: two strong views, only when asked for;
- ``input_ids``, ``attention_mask`` [B,L] int64: the caption, MLM-masked when MLM is on;
- ``mlm_labels`` [B,L] int64 (-100 where not masked): only when MLM is on;
- ``index`` [B] int64: the dataset index of each sample actually used;
- ``skipped``: ``{reason: count}`` of samples that failed to load in this batch. A sample that fails
  (undecodable or vanished image) is replaced by the next good one, so every batch keeps its size
  (ranks all-gather equal sizes).

Captions are tokenised once, when the dataset is built (one batched call of the fast tokenizer).
Images are decoded with PIL, shrunk early (JPEG draft mode, then a resize of the short side to about
1.15x the model's image size), and optionally cached in memory before workers fork. All randomness
(sample order, views, masking) comes from ``(seed, epoch, index)``, so a batch does not depend on the
number of workers, and a run resumed with ``skip_batches`` sees the batches it would have seen.
"""
from __future__ import annotations

import collections
import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .formats import DataError, Record, RecordSet
from .masking import MaskingTables, mask_tokens
from .views import eval_view_one, strong_views_one, weak_view_one

DECODE_MARGIN = 1.15  # decode to this times image_size: room for the crop's resampling
MAX_SUBSTITUTES = 64  # consecutive bad samples tolerated before the loader gives up


def tokenize_captions(tokenizer, captions, context_length: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32 [N,L], attention_mask uint8 [N,L])``, padded and truncated to ``context_length``;
    one batched call of the fast tokenizer per ``chunk`` captions (a single call below that)."""
    captions = list(captions)
    n = len(captions)
    ids = np.zeros((n, context_length), np.int32)
    mask = np.zeros((n, context_length), np.uint8)
    for s in range(0, n, chunk):
        enc = tokenizer(
            captions[s : s + chunk],
            padding="max_length",
            truncation=True,
            max_length=context_length,
            return_tensors="np",
        )
        ids[s : s + chunk] = enc["input_ids"]
        mask[s : s + chunk] = enc["attention_mask"]
    return ids, mask


def _to_uint8_rgb(im: Image.Image) -> Image.Image:
    """RGB; 16-bit and float greyscale (common in medical PNG/TIFF) stretched to 8 bits, not clipped."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8), "L")
    return im.convert("RGB")


def decode_image(path, target: int) -> np.ndarray:
    """A file (path or file object) -> ``HxWx3`` uint8 with the short side shrunk to ``target`` (never
    enlarged). Raises on a bad file."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (target, target))  # DCT scaling: decodes at 1/2, 1/4, 1/8 when that still covers target
        return fit_image(im, target)


def fit_image(im: Image.Image, target: int) -> np.ndarray:
    """A decoded PIL image -> ``HxWx3`` uint8 RGB, short side shrunk to ``target`` (never enlarged)."""
    return _shrink(_to_uint8_rgb(im), target)


def eval_image(image, image_size: int) -> torch.Tensor:
    """The evaluation transform of one image (a path, a PIL image or an encoded file's bytes) ->
    normalised ``[3,S,S]``: the same decode and eval view as an eval loader's batch."""
    target = round(image_size * DECODE_MARGIN)
    if isinstance(image, Image.Image):
        array = fit_image(image, target)
    else:
        array = decode_image(io.BytesIO(image) if isinstance(image, bytes) else str(image), target)
    return eval_view_one(array, image_size)


def _shrink(im: Image.Image, target: int) -> np.ndarray:
    w, h = im.size
    short = min(w, h)
    if short > target:
        size = (max(1, round(w * target / short)), max(1, round(h * target / short)))
        im = im.resize(size, Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(im)


def _shrink_array(arr: np.ndarray, target: int) -> np.ndarray:
    """An in-memory ``HxWx3`` image with its short side shrunk to ``target``; a greyscale image
    broadcast over its channels (the phantom's) stays a broadcast view of one channel."""
    if min(arr.shape[:2]) <= target:
        return arr
    if arr.ndim == 3 and arr.strides[2] == 0:
        small = _shrink(Image.fromarray(np.ascontiguousarray(arr[:, :, 0])), target)
        return np.broadcast_to(small[:, :, None], (*small.shape, 3))
    return _shrink(Image.fromarray(np.ascontiguousarray(arr)), target)


def _failure_reason(err: Exception) -> str:
    return "missing_image" if isinstance(err, FileNotFoundError) else "undecodable_image"


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


class CaptionImageDataset(Dataset):
    """Records with their captions tokenised; ``load_image(i)`` decodes (or reads the cache)."""

    def __init__(self, records: list[Record], input_ids, attention_mask, image_size: int, record_skipped=None):
        self.records = records
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.image_size = image_size
        self.decode_size = round(image_size * DECODE_MARGIN)
        self.record_skipped = collections.Counter(record_skipped or {})  # skipped when reading the records
        self._cache: list[np.ndarray | None] | None = None
        self._cache_errors: dict[int, str] = {}
        self.cache_failed: collections.Counter = collections.Counter()  # images that failed to decode when cached

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    def load_image(self, i: int) -> np.ndarray:
        if self._cache is not None:
            if i in self._cache_errors:
                raise OSError(self._cache_errors[i])
            return self._cache[i]
        image = self.records[i].image
        if isinstance(image, np.ndarray):
            return image
        return decode_image(image, self.decode_size)

    def fill_cache(self) -> collections.Counter:
        """Decode every image once into memory (uint8, short side ``decode_size``); failures are
        remembered and counted, and still substituted at load time."""
        cache: list[np.ndarray | None] = []
        failed = collections.Counter()
        for i, r in enumerate(self.records):
            try:
                if isinstance(r.image, np.ndarray):
                    img = _shrink_array(r.image, self.decode_size)
                else:
                    img = decode_image(r.image, self.decode_size)
                cache.append(img)
            except _DECODE_ERRORS as err:
                cache.append(None)
                reason = _failure_reason(err)
                self._cache_errors[i] = reason
                failed[reason] += 1
        self._cache = cache
        self.cache_failed = failed
        return failed

    def __getitem__(self, i):  # the raw sample; the loaders wrap the dataset with their views
        return self.load_image(i), self.input_ids[i], self.attention_mask[i]


def build_dataset(
    records, tokenizer, image_size: int, context_length: int, cache_images: bool = False
) -> CaptionImageDataset:
    """Tokenise every caption once and, with ``cache_images``, decode every image into memory now
    (before any worker forks, so workers share it)."""
    skipped = records.skipped if isinstance(records, RecordSet) else None
    records = list(records.records if isinstance(records, RecordSet) else records)
    if not records:
        raise DataError("no records to build a dataset from")
    ids, mask = tokenize_captions(tokenizer, [r.caption for r in records], context_length)
    ds = CaptionImageDataset(records, ids, mask, image_size, skipped)
    if cache_images:
        ds.fill_cache()
    return ds


def _generator(*entropy: int) -> torch.Generator:
    seed = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


class _ViewDataset(Dataset):
    """The dataset as one loader sees it: views, per-sample seeds, substitution of bad samples."""

    def __init__(self, base: CaptionImageDataset, mode: str, seed: int, epoch: int, weak_scale, strong_scale,
                 strong: bool):
        self.base, self.mode, self.seed, self.epoch = base, mode, seed, epoch
        self.weak_scale, self.strong_scale, self.strong = tuple(weak_scale), tuple(strong_scale), strong
        self._bad: dict[int, str] = {}  # per worker: indices known to fail, and why

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
        """Sample ``i``, or the next one that loads. ``skipped`` counts this sample once, by the
        reason it failed (the substitutes tried on the way are other samples' business)."""
        n = len(self.base)
        for k in range(min(n, MAX_SUBSTITUTES)):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                image = self.base.load_image(j)
                break
            except _DECODE_ERRORS as err:
                self._bad[j] = _failure_reason(err)
        else:
            raise DataError(
                f"{min(n, MAX_SUBSTITUTES)} samples in a row from index {i} failed to load "
                f"({self._bad.get(i)}: {self.base.records[i].image!r} and the next ones)"
            )
        skipped = collections.Counter({self._bad[i]: 1} if j != i else {})
        size = self.base.image_size
        sample = {"index": j, "input_ids": self.base.input_ids[j], "attention_mask": self.base.attention_mask[j],
                  "skipped": skipped}
        if self.mode == "eval":
            sample["image"] = eval_view_one(image, size)
            return sample
        g = _generator(self.seed, self.epoch, j)
        sample["image"] = weak_view_one(image, size, g, self.weak_scale)
        if self.strong:
            sample["image_a"], sample["image_b"] = strong_views_one(image, size, g, self.strong_scale)
        return sample


class _Collate:
    """Stacks samples into the batch contract; applies MLM masking to the whole batch at once."""

    def __init__(self, mlm: MaskingTables | None, mlm_prob: float, seed: int, epoch: int):
        self.mlm, self.mlm_prob, self.seed, self.epoch = mlm, mlm_prob, seed, epoch

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict = {"index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}
        for key in ("image", "image_a", "image_b"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        ids = torch.from_numpy(np.stack([s["input_ids"] for s in samples])).long()
        mask = torch.from_numpy(np.stack([s["attention_mask"] for s in samples])).long()
        if self.mlm is not None:
            g = _generator(self.seed, self.epoch, 1 << 30, *batch["index"].tolist())
            ids, batch["mlm_labels"] = mask_tokens(ids, mask, self.mlm, self.mlm_prob, g)
        batch["input_ids"], batch["attention_mask"] = ids, mask
        skipped = collections.Counter()
        for s in samples:
            skipped.update(s["skipped"])
        batch["skipped"] = dict(skipped)
        return batch


class DistributedBatchSampler:
    """Per-rank batches of one epoch: a permutation drawn from ``(seed, epoch)``, cut into global
    batches of ``batch_size * world_size``; rank ``r`` takes the ``r``-th slice of each. The tail
    that does not fill a global batch is dropped, so every rank has the same number of full
    batches, and one process with ``batch_size * world_size`` sees the same global batches.
    ``skip_batches`` resumes mid-epoch."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, skip_batches: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.epoch, self.skip_batches, self.shuffle = seed, epoch, skip_batches, shuffle
        self.num_batches = n // (batch_size * world_size)  # per rank, per epoch, before skipping

    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip_batches)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        step = self.batch_size * self.world_size
        for k in range(self.skip_batches, self.num_batches):
            start = k * step + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()


def _data_loader(view_ds, batch_sampler, collate, num_workers: int) -> DataLoader:
    return DataLoader(
        view_ds,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers > 0 else None,
    )


def build_loader(
    dataset: CaptionImageDataset,
    batch_size_per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    strong_views: bool = False,
    mlm: MaskingTables | None = None,
    mlm_prob: float = 0.15,
    num_workers: int = 0,
    weak_scale=(0.5, 1.0),
    strong_scale=(0.08, 1.0),
    skip_batches: int = 0,
) -> DataLoader:
    """The training loader of one epoch on one rank (see :class:`DistributedBatchSampler`)."""
    sampler = DistributedBatchSampler(len(dataset), batch_size_per_rank, rank, world_size, seed, epoch, skip_batches)
    if sampler.num_batches == 0:
        raise DataError(
            f"{len(dataset)} samples do not fill one global batch of {batch_size_per_rank} x {world_size} ranks; "
            "lower train.batch_size"
        )
    view_ds = _ViewDataset(dataset, "train", seed, epoch, weak_scale, strong_scale, strong_views)
    return _data_loader(view_ds, sampler, _Collate(mlm, mlm_prob, seed, epoch), num_workers)


def build_eval_loader(dataset: CaptionImageDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Every sample once, in order, with the eval view and unmasked captions (last batch may be short)."""
    view_ds = _ViewDataset(dataset, "eval", 0, 0, (1.0, 1.0), (1.0, 1.0), False)
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in range(0, len(dataset), batch_size)]
    return _data_loader(view_ds, batches, _Collate(None, 0.0, 0, 0), num_workers)


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
