"""Reading a packed folder (format: :mod:`.shard_format`): the verified sample list both GPU backends read.

:func:`open_shards` reads the manifest and, for each shard, the sample list of its index file. A
shard whose tar no longer has the size and mtime its marker recorded is checked: the same size and
BLAKE2b digest means a copy, and the pack's index stands; anything else (edited, truncated,
corrupted after packing) is re-verified once: its members are listed from the tar headers, every sample
needs an image and its ``.ids`` (else ``missing_caption`` / ``missing_image``), the ids must lie in
the tokenizer's vocabulary (else ``bad_token_ids``), every image passes the pack's decode check
(else ``undecodable_image``); a shard whose index file is gone is rebuilt from its tar the same
way. The samples that pass are written to
a *verified index* in DALI's format (under ``<folder>/.verified``, or a temporary folder when the
packed folder is read-only). That index is the skip list: DALI's webdataset reader and the torch
dataset only ever see the samples it lists, so a bad sample inside a shard is counted, not fatal.
A tar changed in place with its size and mtime kept is not noticed here (that would mean reading
every byte of every shard at each start): ``unimlip-fast data verify`` reads them all and names the
samples whose digest changed (:mod:`.verify`).

:class:`ShardDataset` is the torch path's map-style dataset over the verified samples: it reads
a sample's bytes with ``os.pread`` (random access, any worker), and returns the image decoded with
PIL (shrunk early, as the CPU loader) or its raw bytes for a GPU decode.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..durable import write_atomic
from .decoding import SampleError, check_image_bytes, decode_image_bytes
from .records import DataError
from .shard_format import (
    IMAGE_EXTS,
    JPEG_EXTS,
    PackedFolder,
    file_digest,
    ids_in_vocabulary,
    parse_index,
    read_manifest,
    write_index,
)

# How verification scans a tar; a verified index cached by an older scan is made again.
SCAN_VERSION = 2
# One row per usable sample.
SAMPLE_DTYPE = np.dtype(
    [
        ("shard", np.int32),
        ("index", np.int64),
        ("img_off", np.int64),
        ("img_size", np.int64),
        ("ids_off", np.int64),
        ("ids_size", np.int64),
        ("jpeg", np.bool_),
    ]
)


@dataclass
class ShardSet:
    """A packed folder, verified: the tars, the index each backend should read, the samples."""

    root: Path
    manifest: dict
    tars: list[Path]
    indices: list[Path]  # verified index per tar (the pack's own where the tar is unchanged)
    samples: np.ndarray  # SAMPLE_DTYPE, in index order, shard by shard
    read_skipped: collections.Counter = field(default_factory=collections.Counter)  # found while verifying
    rebuilt: list[str] = field(default_factory=list)  # tars whose missing index was rebuilt
    skipped_by_shard: dict[str, dict[str, int]] = field(default_factory=dict)  # tar name -> read_skipped's part

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def context_length(self) -> int:
        return int(self.manifest["tokenizer"]["context_length"])

    @property
    def pad_token_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_token_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def epoch_skipped(self) -> dict[str, int]:
        """Samples an epoch loses, by reason: images that failed the decode check when packing and
        everything verification dropped (records the source reader skipped are not included: the
        trainer counts those when it reads the records)."""
        counts = collections.Counter(self.manifest.get("pack_skipped", {}))
        counts.update(self.read_skipped)
        return {k: v for k, v in counts.items() if v}

    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["path"]

    def damage_note(self) -> str:
        """What verification skipped, shard by shard (``shard-000009.tar: 25 missing_in_shard``); '' for none."""
        return "; ".join(
            f"{tar}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
            for tar, counts in sorted(self.skipped_by_shard.items())
        )


def _is_sample_member(m: tarfile.TarInfo, file_size: int) -> bool:
    """Whether a tar member can be part of a sample: a regular file named ``<digits>.<ext>`` (no
    folder, no ``..``, not absolute) whose data lies inside the tar. Links are never followed."""
    name = m.name
    if not m.isfile() or "/" in name or "\\" in name or "." not in name:
        return False
    base = name.split(".", 1)[0]
    return base.isascii() and base.isdigit() and m.offset_data + m.size <= file_size


def _rows(shard: int, samples) -> list[tuple]:
    rows = []
    for sample in samples:
        parts = {ext: (off, size, name) for ext, off, size, name in sample}
        img = next(e for e in parts if e in IMAGE_EXTS)
        off, size, name = parts[img]
        ids_off, ids_size, _ = parts["ids"]
        rows.append((shard, int(name.split(".", 1)[0]), off, size, ids_off, ids_size, img in JPEG_EXTS))
    return rows


def scan_tar(
    path: Path, check_images: bool = True, vocab_size: int | None = None, expected: list[str] | int | None = None
) -> tuple[list, collections.Counter]:
    """The samples of a tar that have an image (decodable) and caption ids (within ``vocab_size``),
    in index form, and the rest counted by reason: ``bad_member`` for each member that is no part
    of a sample (links, paths, other names: never followed or written anywhere), and, given the
    sample keys the pack wrote (``expected``; or their number), ``missing_in_shard`` for those not
    found at all. Reads the
    headers, the ids, and the images' bytes when ``check_images``."""
    groups: dict[str, dict[str, tuple[int, int, str]]] = {}
    order: list[str] = []
    skipped: collections.Counter = collections.Counter()
    file_size = path.stat().st_size
    try:
        # ignore_zeros: a damaged header is passed over block by block (tar members are 512-byte
        # aligned) and the members after it are kept; without it tarfile takes it for the end.
        with tarfile.open(path, "r:", ignore_zeros=True) as tar:
            try:
                for m in tar:
                    if not _is_sample_member(m, file_size):  # a link, a path, a name not of a sample
                        skipped["bad_member"] += 1
                        continue
                    base, ext = m.name.split(".", 1)
                    if base not in groups:
                        groups[base] = {}
                        order.append(base)
                    groups[base][ext] = (m.offset_data, m.size, m.name)
            except (tarfile.ReadError, EOFError):
                pass  # damage past which the tar cannot be read: what was found is kept, the rest counted missing
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise DataError(
            f"{path}: unreadable tar ({e}); repack it (delete its .json marker and run data pack again)"
        ) from e
    if isinstance(expected, int):
        missing = max(0, expected - len(groups))
    else:
        missing = len(set(expected) - set(groups)) if expected is not None else 0
    if missing:
        skipped["missing_in_shard"] = missing
    good = []
    with open(path, "rb") as fh:
        for base in order:
            parts = groups[base]
            img = next((e for e in parts if e in IMAGE_EXTS), None)
            if img is None:
                skipped["missing_image"] += 1
                continue
            if "ids" not in parts or parts["ids"][1] == 0:
                skipped["missing_caption"] += 1
                continue
            if "idx" not in parts:
                skipped["bad_row"] += 1
                continue
            if vocab_size is not None:
                off, size, _ = parts["ids"]
                if not ids_in_vocabulary(os.pread(fh.fileno(), size, off), vocab_size):
                    skipped["bad_token_ids"] += 1
                    continue
            if check_images:
                off, size, _ = parts[img]
                if not check_image_bytes(os.pread(fh.fileno(), size, off)):
                    skipped["undecodable_image"] += 1
                    continue
            good.append([(e, *parts[e]) for e in (img, "ids", "idx") if e in parts])
    return good, skipped


def _packed_keys(root: Path, entry: dict) -> list[str] | int | None:
    """The sample keys the pack wrote into a shard (from its completion marker), else their number
    (the manifest's), else None."""
    marker = PackedFolder(root).marker_of(entry["tar"])
    try:
        digests = json.loads(marker.read_text()).get("sample_digests")
    except (OSError, json.JSONDecodeError, AttributeError):
        digests = None
    if isinstance(digests, dict):
        return list(digests)
    return entry.get("samples") if isinstance(entry.get("samples"), int) else None


def _verified_dir(root: Path) -> Path:
    d = PackedFolder(root).verified
    try:
        d.mkdir(exist_ok=True)
        probe = d / ".probe"
        probe.write_text("")
        probe.unlink()
        return d
    except OSError:
        h = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        d = Path(tempfile.gettempdir()) / f"unimlip_verified_{h}"
        d.mkdir(exist_ok=True)
        return d


def _verify(root: Path, entry: dict, st: os.stat_result, vocab_size: int) -> tuple[Path, list, collections.Counter]:
    """The index to read for a shard whose tar's mtime or size differs from the manifest's, or whose
    index file is gone: the pack's own when it is there and the content is unchanged (a copy: same
    size and digest), else a verified one, rebuilt from the tar. The outcome is cached under the
    verified folder, keyed by the tar's size and mtime."""
    vdir = _verified_dir(root)
    stem = Path(entry["tar"]).stem
    index_path, meta_path = vdir / f"{stem}.idx", vdir / f"{stem}.json"
    own_index = root / entry["index"]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        same_tar = meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns
        if same_tar and meta.get("scan") == SCAN_VERSION:
            if meta.get("unchanged") and own_index.is_file():
                return own_index, parse_index(own_index), collections.Counter()
            if not meta.get("unchanged") and index_path.is_file():
                return index_path, parse_index(index_path), collections.Counter(meta["skipped"])
    tar = root / entry["tar"]
    if (
        own_index.is_file()
        and st.st_size == entry["size"]
        and entry.get("blake2b")
        and file_digest(tar) == entry["blake2b"]
    ):
        write_atomic(
            meta_path,
            json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "scan": SCAN_VERSION, "unchanged": True}),
        )
        return own_index, parse_index(own_index), collections.Counter()
    samples, skipped = scan_tar(tar, vocab_size=vocab_size, expected=_packed_keys(root, entry))
    write_index(index_path, samples)
    write_atomic(
        meta_path,
        json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "scan": SCAN_VERSION, "skipped": dict(skipped)}),
    )
    return index_path, samples, skipped


def open_shards(folder: str | os.PathLike, workers: int | None = None) -> ShardSet:
    """Open a packed folder; shards changed since packing are checked, and re-verified where their
    bytes changed, by ``workers`` processes (default: every core) when there are several."""
    root = Path(folder)
    manifest = read_manifest(root)
    stats = []
    for entry in manifest["shards"]:
        try:
            stats.append((root / entry["tar"]).stat())
        except FileNotFoundError:
            raise DataError(f"{root / entry['tar']} listed in the manifest is missing") from None
    changed = [
        s
        for s, (entry, st) in enumerate(zip(manifest["shards"], stats))
        if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]) or not (root / entry["index"]).is_file()
    ]
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    jobs = [(root, manifest["shards"][s], stats[s], vocab_size) for s in changed]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            verified = dict(zip(changed, pool.map(_verify, *zip(*jobs))))
    else:
        verified = {s: _verify(*job) for s, job in zip(changed, jobs)}

    tars, indices, rows = [], [], []
    read_skipped: collections.Counter = collections.Counter()
    skipped_by_shard: dict[str, dict[str, int]] = {}
    for s, entry in enumerate(manifest["shards"]):
        if s in verified:
            index_path, samples, skipped = verified[s]
            read_skipped.update(skipped)
            if any(skipped.values()):
                skipped_by_shard[entry["tar"]] = {k: v for k, v in skipped.items() if v}
        else:
            index_path = root / entry["index"]
            samples = parse_index(index_path)
        tar = root / entry["tar"]
        if samples:  # DALI rejects a tar with no samples
            tars.append(tar)
            indices.append(index_path)
            rows += _rows(len(tars) - 1, samples)
    if not rows:
        raise DataError(f"{root}: no usable samples ({dict(read_skipped)} skipped)")
    rebuilt = [entry["tar"] for entry in manifest["shards"] if not (root / entry["index"]).is_file()]
    return ShardSet(
        root, manifest, tars, indices, np.array(rows, dtype=SAMPLE_DTYPE), read_skipped, rebuilt, skipped_by_shard
    )


# ------------------------------------------------------------------------------------ ids -> tokens


def ids_to_tokens(ids_rows: list[np.ndarray], context_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpadded int32 id rows -> ``(input_ids, attention_mask)`` int64 ``[B, context_length]``."""
    b = len(ids_rows)
    ids = np.full((b, context_length), pad_id, np.int64)
    mask = np.zeros((b, context_length), np.int64)
    for i, row in enumerate(ids_rows):
        n = min(len(row), context_length)
        ids[i, :n] = row[:n]
        mask[i, :n] = 1
    return ids, mask


# ------------------------------------------------------------------------------ the torch dataset


class ShardDataset:
    """Map-style dataset over a :class:`ShardSet`. ``__getitem__(j)`` -> dict with ``index`` (the
    record index), ``ids`` (int32, unpadded) and either ``image`` (``HxWx3`` uint8, decoded with
    PIL and shrunk to ``decode_size`` on the short side) or, with ``raw_jpeg`` and a JPEG, ``jpeg``
    (the encoded bytes as a uint8 array, for a batched GPU decode). A sample that fails to decode
    raises ``OSError``; the loader substitutes and counts it."""

    def __init__(self, shards: ShardSet, decode_size: int, raw_jpeg: bool = False):
        self.shards, self.decode_size, self.raw_jpeg = shards, decode_size, raw_jpeg
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shards)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards.tars[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read in {self.shards.tars[shard]}")
        return data

    def read_ids(self, j: int) -> np.ndarray:
        """Sample ``j``'s caption ids (int32, unpadded); ids outside the vocabulary (a shard damaged
        in place) raise :class:`.decoding.SampleError` ``bad_token_ids``, which the loader counts."""
        row = self.shards.samples[j]
        data = self._read(int(row["shard"]), int(row["ids_off"]), int(row["ids_size"]))
        if not ids_in_vocabulary(data, self.shards.vocab_size):
            raise SampleError("bad_token_ids", f"sample {int(row['index'])} of {self.shards.tars[int(row['shard'])]}")
        return np.frombuffer(data, "<i4")

    def __getitem__(self, j: int) -> dict:
        row = self.shards.samples[j]
        shard = int(row["shard"])
        ids = self.read_ids(j)
        data = self._read(shard, int(row["img_off"]), int(row["img_size"]))
        sample = {"index": int(row["index"]), "ids": ids}
        if self.raw_jpeg and row["jpeg"]:
            sample["jpeg"] = np.frombuffer(data, np.uint8)
            return sample
        sample["image"] = decode_image_bytes(data, self.decode_size)
        return sample


# ----------------------------------------------------------------------- opened once, checked


_OPENED: dict[tuple, ShardSet] = {}
_CHECKED: set[tuple] = set()


def load_shards(shards: str | os.PathLike | ShardSet, dataset=None) -> ShardSet:
    """Open (once per process and manifest version) a packed folder, checked against ``dataset``
    (once per dataset)."""
    if isinstance(shards, ShardSet):
        return shards
    root = Path(shards)
    manifest = PackedFolder(root).manifest
    key = (str(root.resolve()), manifest.stat().st_mtime_ns if manifest.is_file() else 0)
    if key not in _OPENED:
        _OPENED[key] = open_shards(root)
    if dataset is not None and (key, id(dataset)) not in _CHECKED:
        check_against_dataset(_OPENED[key], dataset)
        _CHECKED.add((key, id(dataset)))
    return _OPENED[key]


def check_against_dataset(shards: ShardSet, dataset, n: int = 256) -> None:
    """Refuse shards that are not the run's records with the run's tokenizer (up to ``n`` samples compared)."""
    if int(shards.samples["index"].max()) >= len(dataset):
        raise DataError(
            f"{shards.root} holds record indices beyond the {len(dataset)} records of the run's data: "
            "it was packed from another data set or split"
        )
    if shards.context_length != dataset.input_ids.shape[1]:
        raise DataError(
            f"{shards.root} was packed with context length {shards.context_length}, the run uses "
            f"{dataset.input_ids.shape[1]} (model.text.context_length); repack with --context-length"
        )
    reader = ShardDataset(shards, 1)
    picks, rows = [], []
    for j in np.linspace(0, len(shards) - 1, min(n, len(shards))).astype(int):
        try:
            rows.append(reader.read_ids(j))
            picks.append(j)
        except SampleError:  # a damaged sample, counted when read: it says nothing about the tokenizer
            continue
    if not picks:
        return
    packed, packed_mask = ids_to_tokens(rows, shards.context_length, shards.pad_token_id)
    index = [int(shards.samples[j]["index"]) for j in picks]
    mask = dataset.attention_mask[index].astype(bool)
    if not (
        np.array_equal(packed_mask.astype(bool), mask) and np.array_equal(packed[mask], dataset.input_ids[index][mask])
    ):
        raise DataError(
            f"the caption ids in {shards.root} differ from the run's tokenizer "
            f"({shards.manifest['tokenizer']['name']} when packed): repack with --tokenizer pointing at "
            "the run's tokenizer (runs/<name>/tokenizer, or the model.text.encoder name)"
        )
