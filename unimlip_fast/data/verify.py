"""``unimlip-fast data verify DIR``: read every byte of a packed folder and say what changed.

Opening a packed folder for training trusts a tar whose size and mtime match its marker (reading
every shard at each start would cost minutes on PMC-OA); a byte changed in place with both kept
goes unseen there. This check reads everything: each sample's members are hashed as packing
hashed them (:func:`.shard_format.sample_digest`) and compared with the marker's, and each sample
is checked as verification checks it (ids inside the vocabulary, image decodable). It names the
samples that changed, went missing or appeared, the damaged ones, and the missing index files.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .decoding import check_image_bytes
from .shard_format import IMAGE_EXTS, PackedFolder, file_digest, ids_in_vocabulary, read_manifest, sample_digest


@dataclass
class ShardReport:
    tar: str
    samples: int = 0
    changed: list[str] = field(default_factory=list)  # sample keys whose digest differs from packing's
    missing: list[str] = field(default_factory=list)  # packed, no longer in the tar
    unexpected: list[str] = field(default_factory=list)  # in the tar, not packed
    bad_token_ids: list[str] = field(default_factory=list)
    undecodable_image: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # whole-shard: missing tar or index, no digests

    @property
    def ok(self) -> bool:
        return not (
            self.changed
            or self.missing
            or self.unexpected
            or self.bad_token_ids
            or self.undecodable_image
            or self.problems
        )

    def describe(self, limit: int = 5) -> str:
        parts = list(self.problems)
        for name in ("changed", "missing", "unexpected", "bad_token_ids", "undecodable_image"):
            keys = getattr(self, name)
            if keys:
                more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {name.replace('_', ' ')}: {', '.join(keys[:limit])}{more}")
        return f"{self.tar}: " + ("; ".join(parts) if parts else f"{self.samples} samples unchanged")


def _read_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile() or "." not in Path(member.name).name:
                continue
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def verify_shard(root: Path, marker: dict, vocab_size: int) -> ShardReport:
    report = ShardReport(marker["tar"])
    tar_path = root / marker["tar"]
    if not tar_path.is_file():
        report.problems.append("the tar is missing")
        return report
    if not (root / marker["index"]).is_file():
        report.problems.append(f"index {marker['index']} is missing (training rebuilds it from the tar)")
    try:
        samples = _read_samples(tar_path)
    except (tarfile.TarError, EOFError, OSError) as e:
        report.problems.append(f"unreadable tar ({e})")
        return report
    report.samples = len(samples)
    recorded: dict[str, str] | None = marker.get("sample_digests")
    if recorded is None:
        if marker.get("blake2b") and file_digest(tar_path) != marker["blake2b"]:
            report.problems.append("its bytes changed (packed without per-sample digests: repack to learn which)")
    else:
        report.changed = sorted(k for k in samples if k in recorded and sample_digest(samples[k]) != recorded[k])
        report.missing = sorted(set(recorded) - set(samples))
        report.unexpected = sorted(set(samples) - set(recorded))
    for key, parts in sorted(samples.items()):
        if "ids" in parts and not ids_in_vocabulary(parts["ids"], vocab_size):
            report.bad_token_ids.append(key)
        image = next((parts[e] for e in parts if e in IMAGE_EXTS), None)
        if image is not None and not check_image_bytes(image):
            report.undecodable_image.append(key)
    return report


def verify_packed(folder: str | Path) -> list[ShardReport]:
    """One report per shard of a packed folder (reads every byte)."""
    root = Path(folder)
    manifest = read_manifest(root)
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    reports = []
    for entry in manifest["shards"]:
        marker_path = PackedFolder(root).marker_of(entry["tar"])
        marker = json.loads(marker_path.read_text()) if marker_path.is_file() else dict(entry)
        reports.append(verify_shard(root, marker, vocab_size))
    return reports
