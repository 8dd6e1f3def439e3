"""Benchmark: `unimlip-fast data pack` at PMC-OA's shape, interrupted and resumed.

Packing PMC-OA's 1.65M pairs must be possible on a workstation: streaming, parallel,
resumable. This builds a PMC-OA-format folder of ``--records`` pairs (``pmc_oa.jsonl`` and one
image file per pair, hard links to MedPix's 256 px JPEGs, so the bytes are real medical JPEGs;
captions of PMC-OA's length, 20 to 90 words), then through the CLI, each in its own process:

1. packs it and kills the packer (SIGKILL, as a crash or a job limit would) once about 40% of the
   shards are done;
2. runs the same command again, which must pack only the missing shards;
3. checks the manifest: every record packed once, none skipped.

It prints records per second per packing process, the packer's peak memory (the parent, which
holds the record list, and one worker) and what those give for 1.65M pairs on 16 processes.

    python bench/bench_pack.py                       # 50,000 pairs, every core; a row in bench/results.csv
    python bench/bench_pack.py --records 200000 --workers 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, SHARED_DATA, append_rows, environment

MEDPIX = SHARED_DATA / "medpix2"
PMC_OA_PAIRS = 1_650_000
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"

# Run in the packer's process: the CLI, then its own and its workers' peak memory on stderr.
_PACKER = """
import resource, sys
from unimlip_fast.cli import main
sys.argv = ["unimlip-fast", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
print("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, file=sys.stderr)
"""


def medpix_captions() -> list[str]:
    path = MEDPIX / "splitted_dataset" / "descriptions_train.jsonl"
    if not path.is_file():
        raise SystemExit(
            f"MedPix not found at {MEDPIX} (../shared/data beside the repository, or $UNIMLIP_SHARED_DATA)"
        )
    return [json.loads(line)["Description"]["Caption"] for line in path.open()]


def make_pmc_oa(root: Path, n: int, captions: list[str], seed: int = 0) -> None:
    """``root/pmc_oa.jsonl`` and ``root/images/PMC<k>_fig<j>.jpg`` (hard links to MedPix JPEGs),
    captions cut from MedPix's words."""
    sources = sorted((MEDPIX / "images").glob("*.jpg"))
    words = " ".join(captions).split()
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    with (root / "pmc_oa.jsonl").open("w") as fh:
        for k in range(n):
            name = f"PMC{1000000 + k // 3}_fig{k % 3}.jpg"
            os.link(sources[k % len(sources)], images / name)
            start, length = rng.randrange(len(words) - 100), rng.randint(20, 90)
            fh.write(json.dumps({"image": name, "caption": " ".join(words[start : start + length])}) + "\n")


def fitted_tokenizer(folder: Path, captions: list[str]) -> None:
    """A WordPiece vocabulary fitted to the captions (nothing is downloaded)."""
    from unimlip_fast.config import TextConfig
    from unimlip_fast.model import build_tokenizer

    build_tokenizer(TextConfig(encoder="random-bert", vocab_size=8192), captions).save_pretrained(str(folder))


def record_list_bytes(folder: Path, n: int) -> float:
    """Bytes per record of the list the packer's parent holds (the reader's output): what the
    Python allocator still holds for it once read. tracemalloc counts those objects themselves;
    resident memory would not, as the heap reuses pages freed by earlier work in the process."""
    import tracemalloc

    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.sources import read_records

    tracemalloc.start()
    try:
        records = read_records(DataConfig(format="pmc-oa", path=str(folder)), "all")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records.items) == n
    return held / n


def packer(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", _PACKER, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def markers(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.json"))


def run(
    n_records: int, workers: int, shard_size: int, kill_at: float = 0.4, csv_path: str | Path | None = None
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        captions = medpix_captions()
        make_pmc_oa(tmp / "pmc_oa", n_records, captions)
        fitted_tokenizer(tmp / "tokenizer", captions)
        per_record = record_list_bytes(tmp / "pmc_oa", n_records)
        print(f"made {n_records:,} PMC-OA-format pairs in {time.perf_counter() - t0:.1f} s", flush=True)
        out = tmp / "shards"
        args = [
            "data",
            "pack",
            "--format",
            "pmc-oa",
            "--input",
            str(tmp / "pmc_oa"),
            "--output",
            str(out),
            "--split",
            "all",
            "--tokenizer",
            str(tmp / "tokenizer"),
            "--shard-size",
            str(shard_size),
            "--workers",
            str(workers),
        ]
        n_shards = -(-n_records // shard_size)

        t0 = time.perf_counter()
        first = packer(args)
        while first.poll() is None and len(markers(out)) < kill_at * n_shards:
            time.sleep(0.05)
        if first.poll() is not None:
            raise SystemExit(
                f"the packer ended before it could be interrupted ({first.returncode}): "
                f"use more --records\n{first.stderr.read()}"
            )
        os.killpg(first.pid, signal.SIGKILL)  # the packer and its pool, as a crash would
        first.wait()
        killed_after = time.perf_counter() - t0
        done_before = {p.name: p.stat().st_mtime_ns for p in markers(out)}
        records_before = sum(json.loads(p.read_text())["records"] for p in markers(out))
        print(
            f"killed the packer after {killed_after:.1f} s with {len(done_before)}/{n_shards} shards done", flush=True
        )

        t0 = time.perf_counter()
        second = packer(args)
        _, err = second.communicate()
        resumed = time.perf_counter() - t0
        if second.returncode != 0:
            raise SystemExit(f"the resumed pack failed ({second.returncode}):\n{err}")
        peak_parent, peak_worker = (float(v) for v in err.strip().splitlines()[-1].split()[1:])

        manifest = json.loads((out / "manifest.json").read_text())
        redone = [name for name, mtime in done_before.items() if (out / name).stat().st_mtime_ns != mtime]
        packed_again = n_shards - len(done_before)
        assert manifest["n_samples"] == n_records and not manifest["skipped"], manifest["skipped"]
        assert not redone, f"the resumed run repacked finished shards: {redone[:5]}"
        packed_keys = [
            line.split()[3].split(".")[0]
            for idx in out.glob("shard-*.idx")
            for line in idx.read_text().splitlines()[1:]
        ]  # each sample's first member
        assert len(packed_keys) == len(set(packed_keys)) == n_records, "a record is missing or packed twice"
        size = sum(p.stat().st_size for p in out.glob("shard-*.tar"))

    rate = (n_records - records_before) / resumed  # records per second of the resumed run, all processes
    per_process = rate / workers
    result = {
        "records": n_records,
        "workers": workers,
        "shard_size": shard_size,
        "shards": n_shards,
        "shards_before_kill": len(done_before),
        "shards_resumed": packed_again,
        "resumed_s": round(resumed, 1),
        "records_per_s": round(rate),
        "records_per_s_per_process": round(per_process),
        "peak_parent_mib": round(peak_parent),
        "peak_worker_mib": round(peak_worker),
        "record_list_bytes_per_record": round(per_record),
        "shard_bytes": size,
    }
    minutes = PMC_OA_PAIRS / (per_process * 16) / 60
    parent_gib = (peak_parent * 2**20 + per_record * (PMC_OA_PAIRS - n_records)) / 2**30
    print(
        f"resumed: packed the {packed_again} missing shards in {resumed:.1f} s ({rate:,.0f} records/s on "
        f"{workers} processes, {per_process:,.0f} per process); finished shards untouched; manifest: "
        f"{manifest['n_samples']:,} samples, none skipped; {size / 2**20:,.0f} MiB of shards"
    )
    print(
        f"peak memory: packer parent {peak_parent:,.0f} MiB, largest worker {peak_worker:,.0f} MiB; the record "
        f"list the parent holds: {per_record:,.0f} bytes per record"
    )
    print(
        f"for PMC-OA's {PMC_OA_PAIRS:,} pairs on 16 such processes: about {minutes:.0f} min, with about "
        f"{parent_gib:.1f} GiB in the parent (its peak here plus the record list for the other pairs), writing "
        f"{size / n_records * PMC_OA_PAIRS / 2**30:,.0f} GiB of shards at these images' sizes"
    )
    if csv_path:
        import torch

        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        append_rows(
            csv_path,
            [{"bench": "pack", "time": stamp, **result, "cpus": os.cpu_count(), **environment(torch.device("cpu"))}],
        )
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV file the row is appended to")
    args = parser.parse_args(argv)
    run(args.items, args.workers, args.shard_size, csv_path=args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
