"""One entry point for the trainer's loader, whatever the backend (``data.backend``).

- ``cpu``: :func:`.loader.build_loader` (PIL decode and views in DataLoader workers).
- ``torch``: :class:`.torch_loader.TorchGPULoader`: decode in workers (or nvJPEG through
  torchvision), views as batched ops on the training device; reads packed shards when given,
  else the records of the trainer's dataset.
- ``dali``: :class:`.dali.DALILoader` over packed shards (needs ``shards``).
- ``auto``: DALI where it imports, CUDA is there and shards are given; else torch on CUDA; else cpu.

Every backend yields the same batch contract (:mod:`.loader`), ``skipped`` included, and makes the
strong views only when ``strong_views`` is set; the GPU backends' tensors are already on ``device``
and their images in ``dtype``. The returned loader says what it is in ``description``.

Shards and the trainer's dataset must agree: a shard's sample carries its record's index in the
source split, and its caption ids must be those the run's tokenizer gives. The first time a packed
folder is used with a dataset, up to 256 samples are compared (an error says how to repack).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .formats import DataError
from .loader import CaptionImageDataset, build_loader
from .masking import MaskingTables
from .shards import ShardDataset, ShardSet, ids_to_tokens, open_shards

BACKENDS = ("cpu", "torch", "dali", "auto")
_OPENED: dict[tuple, ShardSet] = {}


def resolve_backend(backend: str, device: torch.device | str, shards=None) -> tuple[str, str]:
    """``(backend, why)`` for the requested ``data.backend`` on ``device``."""
    from .dali import dali_available

    device = torch.device(device)
    if backend not in BACKENDS:
        raise DataError(f"data.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise DataError("data.backend=dali: nvidia.dali does not import (pip install 'unimlip-fast[dali]', "
                        "or nvidia-dali-cuda120 on a CUDA 12 driver)")
    if backend == "dali" and not shards:
        raise DataError("data.backend=dali reads packed shards: set data.shards to a `unimlip-fast data pack` folder")
    if backend != "auto":
        return backend, "as configured"
    if device.type == "cuda" and dali_available() and shards:
        return "dali", "auto: DALI imports, CUDA, packed shards"
    if device.type == "cuda":
        missing = "DALI not installed" if shards else "no packed shards (data.shards)"
        return "torch", f"auto: CUDA, {missing}"
    return "cpu", "auto: no CUDA device"


def load_shards(shards: str | os.PathLike | ShardSet, dataset: CaptionImageDataset | None = None) -> ShardSet:
    """Open (once per process and manifest version) a packed folder, checked against ``dataset``."""
    if isinstance(shards, ShardSet):
        return shards
    root = Path(shards)
    manifest = root / "manifest.json"
    key = (str(root.resolve()), manifest.stat().st_mtime_ns if manifest.is_file() else 0, id(dataset))
    if key not in _OPENED:
        opened = open_shards(root)
        if dataset is not None:
            check_against_dataset(opened, dataset)
        _OPENED[key] = opened
    return _OPENED[key]


def check_against_dataset(shards: ShardSet, dataset: CaptionImageDataset, n: int = 256) -> None:
    if int(shards.samples["index"].max()) >= len(dataset):
        raise DataError(f"{shards.root} holds record indices beyond the {len(dataset)} records of the run's data: "
                        "it was packed from another data set or split")
    if shards.context_length != dataset.input_ids.shape[1]:
        raise DataError(f"{shards.root} was packed with context length {shards.context_length}, the run uses "
                        f"{dataset.input_ids.shape[1]} (model.text.context_length); repack with --context-length")
    reader = ShardDataset(shards, 1)
    picks = np.linspace(0, len(shards) - 1, min(n, len(shards))).astype(int)
    packed, packed_mask = ids_to_tokens([reader.read_ids(j) for j in picks], shards.context_length,
                                        shards.pad_token_id)
    index = [int(shards.samples[j]["index"]) for j in picks]
    mask = dataset.attention_mask[index].astype(bool)
    if not (np.array_equal(packed_mask.astype(bool), mask)
            and np.array_equal(packed[mask], dataset.input_ids[index][mask])):
        raise DataError(f"the caption ids in {shards.root} differ from the run's tokenizer "
                        f"({shards.manifest['tokenizer']['name']} when packed): repack with --tokenizer pointing at "
                        "the run's tokenizer (runs/<name>/tokenizer, or the model.text.encoder name)")


class TrainLoader:
    """What :func:`build_train_loader` returns: iterate for batches; ``backend``, ``description``."""

    def __init__(self, inner, backend: str, description: str):
        self.inner, self.backend, self.description = inner, backend, description

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def build_train_loader(
    backend: str,
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
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shards: str | os.PathLike | ShardSet | None = None,
) -> TrainLoader:
    """The training loader of one epoch on one rank, through ``backend`` (see the module doc)."""
    name, why = resolve_backend(backend, device, shards)
    if name == "cpu":
        inner = build_loader(dataset, batch_size_per_rank, rank, world_size, seed, epoch, strong_views, mlm, mlm_prob,
                             num_workers, weak_scale, strong_scale, skip_batches)
        return TrainLoader(inner, "cpu", f"cpu backend ({why}): PIL decode and views in {num_workers} workers")
    image_size = dataset.image_size
    source = load_shards(shards, dataset) if shards else None
    if name == "torch":
        from .torch_loader import TorchGPULoader

        inner = TorchGPULoader(source if source is not None else dataset, batch_size_per_rank, rank, world_size, seed,
                               epoch, strong_views, mlm, mlm_prob, num_workers, weak_scale, strong_scale,
                               skip_batches, torch.device(device), dtype, image_size)
    else:
        from .dali import DALILoader

        inner = DALILoader(source, batch_size_per_rank, rank, world_size, seed, epoch, strong_views, mlm, mlm_prob,
                           image_size, weak_scale, strong_scale, skip_batches, device, dtype,
                           num_threads=max(1, num_workers))
    return TrainLoader(inner, name, f"{inner.description} ({why})")
