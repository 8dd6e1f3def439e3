"""Choosing the training backend (``data.backend``); every backend is ``Backend(source, spec)``.

- ``cpu``: :class:`.cpu_loader.CPULoader` (PIL decode and views in DataLoader workers).
- ``torch``: :class:`.torch_loader.TorchLoader`: decode in workers (or nvJPEG through
  torchvision), views as batched ops on the training device; reads packed shards when given,
  else the records of the trainer's dataset.
- ``dali``: :class:`.dali.DALILoader` over packed shards (needs ``shards``; optional dependency).
- ``auto``: DALI where it imports, CUDA is there and shards are given; else torch on CUDA or with
  shards; else cpu. ``cpu`` with shards is refused (it reads the source files only).
  A DALI pipeline that fails to build or to yield its first batch then falls back to the torch GPU
  path, with the reason logged and in the loader's ``description``, for the rest of the run (the
  trainer passes the failure on to the loaders of later epochs and phases, which do not try DALI
  again); ``dali`` asked for by name fails.

Every backend yields the same batch (:mod:`.spec`), ``skipped`` included, and makes the strong
views only when ``spec.strong_views`` is set. The returned loader says what it is in
``description`` and which backend it is in ``name``.

Shards and the trainer's dataset must agree: a shard's sample carries its record's index in the
source split, and its caption ids must be those the run's tokenizer gives. The first time a packed
folder is used with a dataset, up to 256 samples are compared (an error says how to repack).
"""

from __future__ import annotations

import logging
import os
import typing
from collections.abc import Iterator

import torch

from ..config import DataBackend
from .dali import dali_available
from .dataset import CaptionImageDataset
from .records import DataError
from .shards import ShardSet, load_shards
from .spec import LoaderSpec

BACKENDS: tuple[str, ...] = typing.get_args(DataBackend)
log = logging.getLogger(__name__)


def resolve_backend(backend: DataBackend, device: torch.device | str, shards=None) -> tuple[str, str]:
    """``(backend, why)`` for the requested ``data.backend`` on ``device``."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise DataError(f"data.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise DataError(
            "data.backend=dali: nvidia.dali does not import (pip install 'unimlip-fast[dali]', "
            "or nvidia-dali-cuda120 on a CUDA 12 driver)"
        )
    if backend == "dali" and not shards:
        raise DataError("data.backend=dali reads packed shards: set data.shards to a `unimlip-fast data pack` folder")
    if backend == "cpu" and shards:
        raise DataError(
            f"data.shards={shards} is read by data.backend=torch, dali or auto; data.backend=cpu reads "
            "the source files: set data.backend=torch (or auto), or leave data.shards empty"
        )
    if backend != "auto":
        return backend, "as configured"
    if device.type == "cuda" and dali_available() and shards:
        return "dali", "auto: DALI imports, CUDA, packed shards"
    if device.type == "cuda":
        missing = "DALI not installed" if shards else "no packed shards (data.shards)"
        return "torch", f"auto: CUDA, {missing}"
    if shards:
        return "torch", "auto: no CUDA device, packed shards (read by the torch backend)"
    return "cpu", "auto: no CUDA device"


def build_train_loader(
    backend: DataBackend,
    dataset: CaptionImageDataset | None,
    spec: LoaderSpec,
    shards: str | os.PathLike | ShardSet | None = None,
    dali_failed: str | None = None,
):
    """The training loader of ``spec``'s epoch on one rank, through ``backend`` (see the module
    doc). ``shards``, when given, are checked against ``dataset`` once and read by the GPU backends.
    The loader's ``dali_failure`` is why ``auto``'s DALI pipeline failed (None when it did not);
    passed back as ``dali_failed`` for the run's later loaders, they take the torch path at once."""
    name, why = resolve_backend(backend, spec.device, shards)
    failure = None
    if name == "dali" and backend == "auto" and dali_failed:
        name, why, failure = "torch", _fallen_back(dali_failed), dali_failed
    if name == "cpu":
        from .cpu_loader import CPULoader

        loader = CPULoader(dataset, spec)
    elif name == "torch":
        from .torch_loader import TorchLoader

        loader = TorchLoader(load_shards(shards, dataset) if shards else dataset, spec)
    elif backend == "auto":
        source = load_shards(shards, dataset)  # what the shards get wrong is their error, not DALI's
        try:
            loader = FirstBatchChecked(dali_loader(source, spec))
        except Exception as e:  # noqa: BLE001 - any failure of DALI's build or first batch: the torch path runs
            failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
            log.warning("data.backend=auto: the DALI pipeline failed (%s); falling back to the torch GPU path", failure)
            from .torch_loader import TorchLoader

            loader = TorchLoader(source, spec)
            why = _fallen_back(failure)
    else:
        loader = dali_loader(load_shards(shards, dataset), spec)
    loader.description = f"{loader.description} ({why})"
    loader.dali_failure = failure
    return loader


def _fallen_back(failure: str) -> str:
    return f"auto: DALI failed ({failure}), torch GPU path instead"


def dali_loader(source: ShardSet, spec: LoaderSpec):
    from . import dali

    return dali.DALILoader(source, spec)


class FirstBatchChecked:
    """A loader whose first batch was already drawn (so a failure shows before training); iterates once."""

    def __init__(self, loader):
        self.loader = loader
        self.name, self.description = loader.name, loader.description
        self._batches: Iterator = iter(loader)
        self._first = next(self._batches, None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._batches
