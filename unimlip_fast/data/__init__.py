"""Data: records from the supported formats, the phantom set, views, MLM masking, the CPU loader."""
from .formats import DataError, Record, RecordSet, read_records, roco_eval_subset
from .phantom import phantom_records

__all__ = ["DataError", "Record", "RecordSet", "read_records", "roco_eval_subset", "phantom_records"]
