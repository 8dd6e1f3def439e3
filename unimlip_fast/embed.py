"""Embeddings at scale, written in parts, and nearest-neighbour search over them.

An index folder (``unimlip-fast embed``) holds:

- ``index.json``: the checkpoint (its spec and ``weights_sha256``), the source, the part size, the embedding
  width, the storage format and one entry per finished part (records, images and captions embedded,
  images skipped per reason);
- per part ``part-00000``: ``.image.npy`` and ``.text.npy`` (float32 ``[n, D]``, L2-normalised) with
  ``.keys.json`` (``image_keys``, ``text_keys``, ``captions``), or with ``--format parquet``
  ``.image.parquet`` (``key``, ``embedding``) and ``.text.parquet`` (``key``, ``caption``, ``embedding``).

Part ``k`` holds records ``[k*S, (k+1)*S)`` of the source, in the source's order; records stream
through one part at a time, so memory holds one part's images, never the data set. Each part's files
are written under temporary names and renamed, then ``index.json`` is rewritten: a run stopped at any
point and started again keeps every finished part and embeds the rest. An image that cannot be read
is skipped and counted (its caption is still embedded); the counts are in ``index.json``.
"""

from __future__ import annotations

import collections
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.records import DataError
from .data.sources import read_records
from .durable import write_atomic
from .inference import EmbeddingModel

INDEX_VERSION = 1
STORAGE_FORMATS = ("npy", "parquet")


@dataclass(frozen=True)
class Item:
    """One record to embed: its key, caption, and image as a path or as encoded bytes."""

    key: str
    caption: str
    image: str | bytes


# ------------------------------------------------------------------------------------------- sources


def records_source(data_cfg, split: str | None) -> tuple[Iterable[Item], int, dict[str, int]]:
    """A data set on disk -> its items, how many, and the records its reader skipped."""
    record_set = read_records(data_cfg, split)
    items = (Item(r.key, r.caption, str(r.image)) for r in record_set.items)
    return items, len(record_set), dict(record_set.skipped)


def packed_source(folder: str | os.PathLike) -> tuple[Iterable[Item], int, dict[str, int]]:
    """A ``data pack`` folder -> its samples streamed shard by shard in packing order (key, caption
    and the original image bytes, read sequentially from each tar)."""
    from .data.shard_format import read_manifest

    root = Path(folder)
    manifest = read_manifest(root)
    tars = [root / entry["tar"] for entry in manifest["shards"]]
    skipped: collections.Counter = collections.Counter()
    return _stream_tars(tars, skipped), int(manifest["n_samples"]), skipped


def _stream_tars(tars: list[Path], skipped: collections.Counter) -> Iterator[Item]:
    """Samples in tar order; a tar that cannot be read (to its end) is counted as ``unreadable_shard``."""
    from .data.shard_format import IMAGE_EXTS

    for path in tars:
        try:
            with tarfile.open(path, "r|") as tar:
                sample: dict[str, bytes] = {}
                base = None
                for member in tar:
                    if not member.isfile() or "." not in member.name:
                        continue
                    name, ext = member.name.split(".", 1)
                    if name != base and sample:
                        yield from _packed_item(sample, IMAGE_EXTS, skipped)
                        sample = {}
                    base = name
                    sample[ext] = tar.extractfile(member).read()
                if sample:
                    yield from _packed_item(sample, IMAGE_EXTS, skipped)
        except (tarfile.TarError, OSError, EOFError):
            skipped["unreadable_shard"] += 1


def _packed_item(sample: dict[str, bytes], image_exts, skipped: collections.Counter) -> Iterator[Item]:
    image = next((sample[e] for e in image_exts if e in sample), b"")
    if "txt" not in sample:
        skipped["missing_caption"] += 1
        return
    yield Item(sample.get("key", b"").decode(), sample["txt"].decode(), image)


# ---------------------------------------------------------------------------------------- embedding


class _ImageFiles(Dataset):
    """Images through the evaluation transform; a failure is returned as its reason."""

    def __init__(self, images: list, preprocess: Callable):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(self.images[i])
        except FileNotFoundError:
            return i, "missing_image"
        except Exception:  # noqa: BLE001 - any image that does not decode is skipped and counted
            return i, "undecodable_image"


def _collate(samples):
    good = [(i, x) for i, x in samples if isinstance(x, torch.Tensor)]
    failed = collections.Counter(x for _, x in samples if not isinstance(x, torch.Tensor))
    index = [i for i, _ in good]
    return index, (torch.stack([x for _, x in good]) if good else None), failed


def embed_images(
    model: EmbeddingModel,
    images: list,
    batch_size: int = 64,
    workers: int = 0,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[list[int], np.ndarray, dict[str, int]]:
    """Images (paths, bytes or PIL images), decoded in ``workers`` processes and embedded in batches ->
    ``(positions of the images that loaded, their embeddings [n,D] float32, images skipped per reason)``."""
    loader = DataLoader(
        _ImageFiles(images, model.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=model.device.type == "cuda",
    )
    kept, rows, skipped = [], [], collections.Counter()
    for index, batch, failed in loader:
        skipped.update(failed)
        if batch is not None:
            rows.append(model.embed_image_batch(batch).numpy())
            kept += index
        on_batch(len(index) + sum(failed.values()))
    return kept, (np.concatenate(rows) if rows else np.zeros((0, model.embed_dim), np.float32)), dict(skipped)


def embed_part(
    model: EmbeddingModel,
    items: list[Item],
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Image and caption embeddings of one part, and the images skipped per reason."""
    kept, image_rows, skipped = embed_images(model, [it.image for it in items], batch_size, workers, on_batch)
    texts = model.encode_text([it.caption for it in items], batch_size=max(batch_size, 64)).numpy()
    return {
        "image": image_rows,
        "image_keys": [items[i].key for i in kept],
        "text": texts,
        "text_keys": [it.key for it in items],
        "captions": [it.caption for it in items],
        "skipped": skipped,
    }


def _part_name(k: int) -> str:
    return f"part-{k:05d}"


def _save_npy(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, rows)


def write_part(folder: Path, k: int, part: dict[str, Any], storage: str) -> list[str]:
    """One part's files, each written to a temporary name and renamed; returns their names."""
    name = _part_name(k)
    if storage == "npy":
        files = {
            f"{name}.image.npy": lambda p: _save_npy(p, part["image"]),
            f"{name}.text.npy": lambda p: _save_npy(p, part["text"]),
            f"{name}.keys.json": lambda p: p.write_text(
                json.dumps({k_: part[k_] for k_ in ("image_keys", "text_keys", "captions")})
            ),
        }
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def table(rows, keys, captions=None):
            columns = {"key": pa.array(keys, pa.string())}
            if captions is not None:
                columns["caption"] = pa.array(captions, pa.string())
            flat = pa.array(rows.reshape(-1), pa.float32())
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])
            return pa.table(columns)

        files = {
            f"{name}.image.parquet": lambda p: pq.write_table(table(part["image"], part["image_keys"]), p),
            f"{name}.text.parquet": lambda p: pq.write_table(
                table(part["text"], part["text_keys"], part["captions"]), p
            ),
        }
    for file_name, write in files.items():
        write_atomic(folder / file_name, write, what="the embeddings part")
    return list(files)


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_index(folder: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The folder's index, started fresh or continued; another source, model or layout is refused."""
    path = folder / "index.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        return {**header, "parts": [], "complete": False}
    index = json.loads(path.read_text())
    for key in ("checkpoint", "source", "part_size", "format", "embed_dim", "weights_sha256"):
        if index.get(key) != header[key] and (key in index or key != "weights_sha256"):  # older: no digest
            raise DataError(
                f"{folder} holds an index with {key}={index.get(key)!r}, not {header[key]!r}; "
                "embed into an empty folder (or the same settings to resume)"
            )
    return index


def _save_index(folder: Path, index: dict[str, Any]) -> None:
    write_atomic(folder / "index.json", json.dumps(index, indent=1))


@dataclass(frozen=True)
class EmbedOptions:
    """How ``embed`` writes its index: records per part, images per batch, image-decoding workers, the
    parts' file format, and ``progress(done, total)``, called as records are embedded (the CLI draws
    a bar with it)."""

    part_size: int = 4096
    batch_size: int = 64
    workers: int = 0
    storage: str = "npy"
    progress: Callable[[int, int], None] | None = None


def embed_to_index(
    model: EmbeddingModel,
    items: Iterable[Item],
    n_items: int,
    source: str,
    output: str | Path,
    read_skipped: dict[str, int] | None = None,
    options: EmbedOptions = EmbedOptions(),
) -> dict[str, Any]:
    """Embed ``items`` into the index folder ``output`` part by part, resuming a stopped run."""
    part_size, batch_size, workers, storage = options.part_size, options.batch_size, options.workers, options.storage
    progress = options.progress
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(STORAGE_FORMATS)}, got {storage!r}")
    if part_size < 1 or batch_size < 1 or workers < 0:
        raise ValueError("--part-size and --batch-size must be at least 1, --workers at least 0")
    if storage == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise RuntimeError("--format parquet needs pyarrow (pip install pyarrow), or use --format npy") from e
    folder = Path(output)
    header = {
        "version": INDEX_VERSION,
        "checkpoint": model.spec,
        "source": source,
        "part_size": part_size,
        "format": storage,
        "embed_dim": model.embed_dim,
        "n_records": n_items,
        "weights_sha256": model.describe()["weights_sha256"],
    }
    index = _open_index(folder, header)
    finished = {p["part"] for p in index["parts"] if all((folder / f).is_file() for f in p["files"])}
    index["parts"] = [p for p in index["parts"] if p["part"] in finished]
    index["complete"] = False
    done = sum(p["n_records"] for p in index["parts"])
    report = progress or (lambda done, total: None)
    report(done, n_items)
    for k, chunk in enumerate(_chunks(items, part_size)):
        if k in finished:
            continue

        def advance(n: int) -> None:
            nonlocal done
            done += n
            report(done, n_items)

        part = embed_part(model, chunk, batch_size, workers, advance)
        files = write_part(folder, k, part, storage)
        index["parts"].append(
            {
                "part": k,
                "files": files,
                "n_records": len(chunk),
                "n_images": len(part["image_keys"]),
                "n_texts": len(part["text_keys"]),
                "skipped": part["skipped"],
            }
        )
        index["parts"].sort(key=lambda p: p["part"])
        _save_index(folder, index)
    index["complete"] = True
    index["read_skipped"] = dict(read_skipped or {})
    index["n_images"] = sum(p["n_images"] for p in index["parts"])
    index["n_texts"] = sum(p["n_texts"] for p in index["parts"])
    skipped: collections.Counter = collections.Counter()
    for p in index["parts"]:
        skipped.update(p["skipped"])
    index["skipped"] = dict(skipped)
    _save_index(folder, index)
    return index


# -------------------------------------------------------------------------------------------- search


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise DataError(f"{folder} is not an embedding index (no index.json); make one with `unimlip-fast embed`")
    return json.loads(path.read_text())


def iter_part_embeddings(folder: str | Path, kind: str) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
    """Per finished part: ``(embeddings [n,D], keys, the records' captions)`` of ``kind`` image or text."""
    folder = Path(folder)
    index = read_index(folder)
    for p in index["parts"]:
        name = _part_name(p["part"])
        if index["format"] == "npy":
            rows = np.load(folder / f"{name}.{kind}.npy", mmap_mode="r")
            meta = json.loads((folder / f"{name}.keys.json").read_text())
            keys, text_keys, captions = meta[f"{kind}_keys"], meta["text_keys"], meta["captions"]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(folder / f"{name}.{kind}.parquet")
            rows = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, index["embed_dim"])
            keys = table.column("key").to_pylist()
            texts = (
                table if kind == "text" else pq.read_table(folder / f"{name}.text.parquet", columns=["key", "caption"])
            )
            text_keys, captions = texts.column("key").to_pylist(), texts.column("caption").to_pylist()
        caption_of = dict(zip(text_keys, captions))
        yield rows, keys, [caption_of.get(key, "") for key in keys]


def search_index(folder: str | Path, query: torch.Tensor, kind: str, k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` nearest ``kind`` embeddings (cosine) to the normalised ``query [D]``, best first,
    keeping a running top-k over the parts (one part in memory at a time)."""
    q = query.float().numpy().reshape(-1)
    best: list[tuple[float, str, str]] = []
    for rows, keys, captions in iter_part_embeddings(folder, kind):
        if len(keys) == 0:
            continue
        scores = np.asarray(rows) @ q
        top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
        best += [(float(scores[i]), keys[i], captions[i]) for i in top]
        best = sorted(best, key=lambda t: -t[0])[:k]
    return [{"rank": r + 1, "score": round(s, 6), "key": key, "caption": c} for r, (s, key, c) in enumerate(best)]
