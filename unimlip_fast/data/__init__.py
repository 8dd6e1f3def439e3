"""Data: records from the supported formats, the phantom set, views, MLM masking, the backends.

``read_records(cfg.data, split)`` -> ``build_dataset(records, tokenizer, ...)`` ->
``build_train_loader(backend, dataset, spec.for_epoch(epoch, strong_views, skip))`` yields batches
of the batch contract (see :mod:`.spec`). Modules:

- ``records``: what a reader returns (``Record``, ``ItemSet``, ``Skips``, ``DataError``) and the
  split vocabulary; ``sources``: every data set by name (``read_records``, ``read_labelled``,
  ``read_qa``); the readers: ``formats`` (image-caption pairs on disk), ``phantom`` (generated),
  ``labelled`` (chest X-ray labels), ``questions`` (medical VQA), on ``reading``'s helpers;
- ``decoding``: image decoding and the decode check, one copy for every reader;
- ``dataset``: tokenised dataset, per-rank batch sampler, substitution of bad samples;
- ``spec``: ``LoaderSpec`` (what every backend is given) and the batch contract (what it yields);
- ``views``: weak/strong/eval views as batched tensor ops; ``masking``: whole-word MLM masking;
- backends, each ``Backend(source, spec)``: ``cpu_loader``, ``torch_loader``, ``dali`` (optional);
  ``backends`` chooses one;
- ``shard_format`` (the packed folder's format), ``pack`` (its writer), ``shards`` (its reader).
"""

from .backends import build_train_loader, resolve_backend
from .cpu_loader import CPULoader, build_eval_loader
from .dataset import CaptionImageDataset, DistributedBatchSampler, build_dataset, tokenize_captions
from .decoding import decode_image
from .formats import roco_eval_subset
from .masking import MaskingTables, mask_tokens
from .phantom import phantom_records
from .records import DataError, ItemSet, Record, Skips, describe_skips
from .sources import read_labelled, read_qa, read_records
from .spec import LoaderSpec, loader_spec, trim_padding
from .views import CLIP_MEAN, CLIP_STD, eval_view, strong_view, weak_view

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CPULoader",
    "CaptionImageDataset",
    "DataError",
    "DistributedBatchSampler",
    "ItemSet",
    "LoaderSpec",
    "MaskingTables",
    "Record",
    "Skips",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
    "decode_image",
    "describe_skips",
    "eval_view",
    "loader_spec",
    "mask_tokens",
    "phantom_records",
    "read_labelled",
    "read_qa",
    "read_records",
    "resolve_backend",
    "roco_eval_subset",
    "strong_view",
    "tokenize_captions",
    "trim_padding",
    "weak_view",
]
