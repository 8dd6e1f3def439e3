"""Data: records from the supported formats, the phantom set, views, MLM masking, the CPU loader.

``read_records(cfg.data, split)`` -> ``build_dataset(records, tokenizer, ...)`` ->
``build_loader(dataset, ...)`` yields batches of the design's batch contract (see ``loader``).
"""
from .formats import DataError, Record, RecordSet, read_records, roco_eval_subset
from .loader import (
    CaptionImageDataset,
    DistributedBatchSampler,
    build_dataset,
    build_eval_loader,
    build_loader,
    decode_image,
    tokenize_captions,
)
from .masking import MaskingTables, mask_tokens
from .phantom import phantom_records
from .views import CLIP_MEAN, CLIP_STD, eval_view, strong_view, weak_view

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionImageDataset",
    "DataError",
    "DistributedBatchSampler",
    "MaskingTables",
    "Record",
    "RecordSet",
    "build_dataset",
    "build_eval_loader",
    "build_loader",
    "decode_image",
    "eval_view",
    "mask_tokens",
    "phantom_records",
    "read_records",
    "roco_eval_subset",
    "strong_view",
    "tokenize_captions",
    "weak_view",
]
