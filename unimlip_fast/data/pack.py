"""``unimlip-fast data pack``: records -> webdataset tar shards with pre-tokenised captions.

The folder's layout and file formats are in :mod:`.shard_format`.

Packing streams: shard ``k`` holds records ``[k*S, (k+1)*S)`` of the split in a seeded shuffled
order; a process pool packs shards independently (two per worker in flight), each worker reading,
checking and tokenising only its own records (the parent holds only the record list: paths and
captions). A shard is written to a temporary name and renamed, then its marker is written, so a re-run skips every
shard with a marker and packs the rest. Bad records are skipped and counted: ``missing_image``
(the file vanished since listing), ``undecodable_image`` (a cheap decode check: header, then the
JPEG at 1/8 scale) and ``empty_caption``.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PACK_FORMATS, DataConfig
from ..durable import write_atomic
from .dataset import tokenize_captions
from .decoding import check_image_bytes
from .reading import clean_caption
from .records import DataError, Record
from .shard_format import (
    PACK_VERSION,
    TOKENIZER_DIR,
    PackedFolder,
    file_digest,
    member_name,
    sample_digest,
    sample_key,
    write_index,
)
from .sources import read_records


@dataclass(frozen=True)
class PackPlan:
    """What a packed folder is made from; a re-run must match it to resume."""

    source: dict  # format, path, split (the DataConfig fields that select the records)
    n_records: int
    shard_size: int
    tokenizer: str
    context_length: int
    shuffle_seed: int | None

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "n_records": self.n_records,
            "shard_size": self.shard_size,
            "tokenizer": self.tokenizer,
            "context_length": self.context_length,
            "shuffle_seed": self.shuffle_seed,
        }


def load_tokenizer(name_or_path: str):
    """A hub name, a local folder, or ``minilm`` (as ``model.text.encoder``); ``random-bert`` is
    trained per run, so packing needs the folder that run saved (``<run>/tokenizer``)."""
    if name_or_path == "random-bert":
        raise DataError(
            "--tokenizer random-bert: its vocabulary is trained per run; pass the tokenizer folder "
            "a run saved (runs/<name>/tokenizer) or one saved with build_tokenizer(...).save_pretrained"
        )
    from transformers import AutoTokenizer

    from ..text_encoders import resolve_encoder

    try:
        return AutoTokenizer.from_pretrained(resolve_encoder(name_or_path))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the tokenizer {name_or_path!r}: {e}") from e


# ------------------------------------------------------------------------------------- one shard


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one regular file; returns ``(data offset, size)`` for the index."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
    start = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return start + header, len(data)


def pack_shard(
    out_dir: str, shard: int, records: list[tuple[int, str, str, str]], context_length: int, tokenizer=None
) -> dict:
    """Pack ``records`` (``(source index, key, caption, image path)``) into one shard.
    Writes the tar and its index under temporary names, renames them, then the marker."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    out = Path(out_dir)
    folder = PackedFolder(out)
    name = folder.shard_name(shard)
    tar_path, index_path = folder.tar(shard), folder.index(shard)
    skipped: collections.Counter = collections.Counter()
    good = []  # (index, key, caption, image bytes, ext)
    for i, key, caption, image_path in records:
        caption, reason = clean_caption(caption)
        if reason:
            skipped["empty_caption" if reason == "empty_caption" else reason] += 1
            continue
        try:
            data = Path(image_path).read_bytes()
        except FileNotFoundError:
            skipped["missing_image"] += 1
            continue
        except OSError:
            skipped["undecodable_image"] += 1
            continue
        if not check_image_bytes(data):
            skipped["undecodable_image"] += 1
            continue
        ext = Path(image_path).suffix.lower().lstrip(".") or "img"
        good.append((i, key, caption, data, ext))

    ids, mask = tokenize_captions(tokenizer, [g[2] for g in good], context_length)
    lengths = mask.sum(axis=1)
    index, digests = [], {}

    def write_tar(tmp_tar: Path) -> None:
        index.clear()
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for (i, key, caption, data, ext), row, n in zip(good, ids, lengths):
                members = [
                    (ext, data),
                    ("ids", row[:n].astype("<i4").tobytes()),
                    ("idx", np.int64(i).astype("<i8").tobytes()),
                    ("txt", caption.encode()),
                    ("key", str(key).encode()),
                ]
                index.append([(e, *_add_member(tar, member_name(i, e), d), member_name(i, e)) for e, d in members])
                digests[sample_key(i)] = sample_digest(dict(members))

    write_atomic(tar_path, write_tar, what="the shard")
    write_index(index_path, index)
    stat = tar_path.stat()
    marker = {
        "shard": name,
        "tar": tar_path.name,
        "index": index_path.name,
        "samples": len(good),
        "records": len(records),
        "skipped": dict(skipped),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "blake2b": file_digest(tar_path),
        "sample_digests": digests,
    }
    write_atomic(folder.marker(shard), json.dumps(marker))
    return marker


def _pack_shard_job(args) -> dict:
    return pack_shard(*args)


# ---------------------------------------------------------------------------------- whole folder


def _shard_done(out: Path, shard: int) -> dict | None:
    marker = PackedFolder(out).marker(shard)
    if not marker.is_file():
        return None
    m = json.loads(marker.read_text())
    tar = out / m["tar"]
    if not tar.is_file() or tar.stat().st_size != m["size"] or not (out / m["index"]).is_file():
        return None
    return m


@dataclass(frozen=True)
class PackOptions:
    """How ``data pack`` packs: records per shard, caption length, worker processes, the first
    ``limit`` records only, a progress bar, the records' shuffle (``None``: the source's order)."""

    shard_size: int = 1000
    context_length: int = 77
    workers: int = 1
    limit: int | None = None
    progress: bool = True
    shuffle_seed: int | None = 0


def pack(
    data: DataConfig,
    output: str | os.PathLike,
    tokenizer: str,
    split: str | None = None,
    options: PackOptions = PackOptions(),
) -> dict:
    """Pack the records of ``data`` (``split`` overrides ``data.split``) into ``output``; returns the
    manifest. Resumes a folder packed with the same plan; a different plan is an error.

    Records are spread over the shards in an order shuffled with ``shuffle_seed`` (``None``: the
    source's order): sources group similar pairs (a case's images, a paper's subfigures, often with
    one caption), and a reader's shuffle buffer only mixes nearby samples."""
    shard_size, context_length, workers = options.shard_size, options.context_length, options.workers
    limit, progress, shuffle_seed = options.limit, options.progress, options.shuffle_seed
    if data.format not in PACK_FORMATS:
        raise DataError(f"data pack reads {', '.join(PACK_FORMATS)}; got {data.format!r}")
    if shard_size < 1 or context_length < 2:
        raise DataError("--shard-size must be >= 1 and --context-length >= 2")
    split = data.split if split is None else split
    recordset = read_records(data, split)
    records: list[Record] = recordset.items[:limit] if limit else recordset.items
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(tokenizer)
    tok_dir = PackedFolder(out).tokenizer
    plan = PackPlan(
        {"format": data.format, "path": os.path.abspath(data.path), "split": split or "all"},
        len(records),
        shard_size,
        tokenizer,
        context_length,
        shuffle_seed,
    )
    plan_file = PackedFolder(out).plan
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text())
        if previous != plan.as_dict():
            raise DataError(f"{out} was packed with a different plan ({previous}); use another --output")
    else:
        tok.save_pretrained(str(tok_dir))
        plan_file.write_text(json.dumps(plan.as_dict(), indent=2))
    tok_path = str(tok_dir)  # workers load the saved copy: the same vocabulary, nothing downloaded

    n_shards = (len(records) + shard_size - 1) // shard_size
    order = (
        np.random.default_rng(shuffle_seed).permutation(len(records))
        if shuffle_seed is not None
        else np.arange(len(records))
    )
    markers: dict[int, dict] = {}
    todo = []
    for s in range(n_shards):
        done = _shard_done(out, s)
        if done is not None:
            markers[s] = done
        else:
            todo.append(s)

    def job(s: int) -> tuple:  # made when submitted: only a window of shards' records is ever copied
        chunk = [
            (int(i), records[i].key, records[i].caption, str(records[i].image))
            for i in order[s * shard_size : (s + 1) * shard_size]
        ]
        return str(out), s, chunk, context_length

    started = time.time()
    with _Progress(
        progress,
        f"packing {len(records)} records into {out}",
        len(records),
        sum(m["records"] for m in markers.values()),
    ) as bar:
        if workers <= 1:
            _init_worker(tok_path)
            for s in todo:
                m = _pack_shard_job(job(s))
                markers[s] = m
                bar.advance(m["records"])
        elif todo:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(tok_path,)) as pool:
                pending, queue = set(), iter(todo)
                while True:
                    for s in queue:  # keep two shards per worker in flight
                        pending.add(pool.submit(_pack_shard_job, job(s)))
                        if len(pending) >= 2 * workers:
                            break
                    if not pending:
                        break
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        m = future.result()
                        markers[_shard_number(m)] = m
                        bar.advance(m["records"])

    pack_skipped: collections.Counter = collections.Counter()
    for m in markers.values():
        pack_skipped.update(m["skipped"])
    skipped = collections.Counter(recordset.skipped) + pack_skipped
    manifest = {
        "version": PACK_VERSION,
        **plan.as_dict(),
        "tokenizer": {
            "name": tokenizer,
            "path": TOKENIZER_DIR,
            "vocab_size": len(tok),
            "pad_token_id": int(tok.pad_token_id or 0),
            "context_length": context_length,
        },
        "n_records_in_split": len(recordset.items),
        "n_samples": sum(m["samples"] for m in markers.values()),
        "skipped": dict(sorted(skipped.items())),  # by the source reader and by packing
        "pack_skipped": dict(sorted(pack_skipped.items())),  # by packing only
        "shards": [
            {k: markers[s].get(k) for k in ("tar", "index", "samples", "size", "mtime_ns", "blake2b")}
            for s in range(n_shards)
        ],
        "pack_seconds": round(time.time() - started, 1),
    }
    write_atomic(PackedFolder(out).manifest, json.dumps(manifest, indent=2))
    return manifest


def _shard_number(marker: dict) -> int:
    return int(marker["shard"].rsplit("-", 1)[1])


class _Progress:
    """A rich progress bar on a terminal; elsewhere a plain line every tenth of the way."""

    def __init__(self, enabled: bool, description: str, total: int, completed: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from ..console import make_console

        self.console = make_console()
        self.enabled, self.total, self.done, self.description = enabled, max(1, total), completed, description
        self.rich = enabled and self.console.is_terminal
        self.next_line = completed + self.total / 10
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.rich,
        )
        self.task = self.bar.add_task(description, total=total, completed=completed)

    def __enter__(self):
        self.bar.__enter__()
        if self.enabled and not self.rich:
            self.console.print(f"{self.description}: {self.done} done before", highlight=False)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        self.bar.advance(self.task, n)
        if self.enabled and not self.rich and (self.done >= self.next_line or self.done >= self.total):
            self.console.print(f"packed {self.done}/{self.total} records", highlight=False)
            self.next_line += self.total / 10

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)
