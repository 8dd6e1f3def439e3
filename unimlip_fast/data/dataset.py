"""The tokenised dataset, the per-rank sampler, and the substitution of samples that fail to load:
what every backend builds on.

Captions are tokenised once, when the dataset is built (one batched call of the fast tokenizer).
Images are decoded on demand (:mod:`.decoding`), or once into memory with ``cache_images``.
:class:`DistributedBatchSampler` cuts one epoch into per-rank batches; :class:`Substitutes`
replaces a sample that fails to load by the next good one and says why the original was lost.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset

from .decoding import DECODE_ERRORS, SampleError, decode_image, decode_size, failure_reason, shrink_array
from .records import DataError, ItemSet, Record
from .spec import LoaderSpec

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


class CaptionImageDataset(Dataset):
    """Records with their captions tokenised; ``load_image(i)`` decodes (or reads the cache)."""

    def __init__(self, records: list[Record], input_ids, attention_mask, image_size: int, record_skipped=None):
        self.records = records
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.image_size = image_size
        self.decode_size = decode_size(image_size)
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
                raise SampleError(self._cache_errors[i], "when the image cache was filled")
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
                    img = shrink_array(r.image, self.decode_size)
                else:
                    img = decode_image(r.image, self.decode_size)
                cache.append(img)
            except DECODE_ERRORS as err:
                cache.append(None)
                reason = failure_reason(err)
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
    skipped = records.skipped if isinstance(records, ItemSet) else None
    records = list(records.items if isinstance(records, ItemSet) else records)
    if not records:
        raise DataError("no records to build a dataset from")
    ids, mask = tokenize_captions(tokenizer, [r.caption for r in records], context_length)
    ds = CaptionImageDataset(records, ids, mask, image_size, skipped)
    if cache_images:
        ds.fill_cache()
    return ds


class DistributedBatchSampler:
    """Per-rank batches of one epoch: a permutation drawn from ``(seed, epoch)``, cut into global
    batches of ``batch_size * world_size``; rank ``r`` takes the ``r``-th slice of each. The tail
    that does not fill a global batch is dropped, so every rank has the same number of full
    batches, and one process with ``batch_size * world_size`` sees the same global batches.
    ``skip_batches`` resumes mid-epoch."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.epoch, self.skip_batches = seed, epoch, skip_batches
        self.num_batches = n // (batch_size * world_size)  # per rank, per epoch, before skipping

    @classmethod
    def for_spec(cls, n: int, spec: LoaderSpec) -> DistributedBatchSampler:
        """The sampler of ``spec``'s epoch; fewer than one global batch of samples is an error."""
        spec.batches_per_epoch(n)
        return cls(n, spec.batch_size, spec.rank, spec.world_size, spec.seed, spec.epoch, spec.skip_batches)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip_batches)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        step = self.batch_size * self.world_size
        for k in range(self.skip_batches, self.num_batches):
            start = k * step + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()


class Substitutes:
    """Loads sample ``i``, or the next one that loads (wrapping around). Indices known to fail are
    remembered (per worker process) and not tried again."""

    def __init__(self, n: int, load: Callable[[int], object], describe: Callable[[int], str] = str):
        self.n, self.load, self.describe = n, load, describe
        self.bad: dict[int, str] = {}  # index -> why it failed

    def __call__(self, i: int) -> tuple[int, object, dict[str, int]]:
        """``(j, loaded, skipped)``: the index actually used, what ``load(j)`` gave, and
        ``{reason: 1}`` when ``i`` itself failed (the substitutes tried on the way are counted
        when they are drawn themselves)."""
        tries = min(self.n, MAX_SUBSTITUTES)
        for k in range(tries):
            j = (i + k) % self.n
            if j in self.bad:
                continue
            try:
                loaded = self.load(j)
            except DECODE_ERRORS as err:
                self.bad[j] = failure_reason(err)
                continue
            return j, loaded, ({self.bad[i]: 1} if j != i else {})
        raise DataError(
            f"{tries} samples in a row from index {i} failed to load "
            f"({self.bad.get(i)}: {self.describe(i)} and the next ones)"
        )
