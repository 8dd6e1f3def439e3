"""bench/bench_pack.py end to end on a small set: a packer killed mid-way, resumed, nothing lost or repacked."""

import sys
from pathlib import Path

from .helpers import medpix_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_killed_pack_resumes_to_every_record_once():
    medpix_path()  # skips without the real data
    import bench_pack

    result = bench_pack.run(n_records=1200, workers=2, shard_size=40)
    assert result["shards"] == 30
    assert 0 < result["shards_before_kill"] < 30 and result["shards_resumed"] == 30 - result["shards_before_kill"]
    assert result["records_per_s"] > 0 and result["record_list_bytes_per_record"] > 0
