"""data.backend=auto: a DALI pipeline that fails to build or to yield its first batch falls back to the torch GPU
path with the reason logged; data.backend=dali fails loudly. The failures are injected (no GPU needed)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from unimlip_fast.config import DataConfig
from unimlip_fast.data import backends
from unimlip_fast.data.pack import PackOptions, pack

from .helpers import CAPTIONS, shard_loader, tiny_tokenizer_dir


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    (root / "im").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "im" / f"{i}.jpg")
        rows.append({"image": f"{i}.jpg", "caption": CAPTIONS[i % len(CAPTIONS)]})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = DataConfig(format="jsonl", path=str(root / "pairs.jsonl"), image_root=str(root / "im"), split="all")
    pack(
        data,
        root / "packed",
        str(tiny_tokenizer_dir(root)),
        options=PackOptions(shard_size=8, context_length=24, progress=False),
    )
    return root / "packed"


class BuildFails:
    name, description = "dali", "dali backend: injected"

    def __init__(self, source, spec):
        raise RuntimeError("nvJPEG: CUDA driver too old (injected)")


class FirstBatchFails(BuildFails):
    def __init__(self, source, spec):
        self.source = source

    def __len__(self) -> int:
        return 2

    def __iter__(self):
        raise RuntimeError("DALI pipeline: decode error in the first batch (injected)")
        yield


@pytest.fixture
def dali_chosen(monkeypatch):
    """``auto`` takes DALI here, as it would on a CUDA machine with DALI and shards."""
    monkeypatch.setattr(
        backends,
        "resolve_backend",
        lambda backend, device, shards=None: (
            ("dali", "auto: DALI imports, CUDA, packed shards") if backend == "auto" else (backend, "as configured")
        ),
    )


@pytest.mark.parametrize(
    ("failing", "reason"), [(BuildFails, "CUDA driver too old"), (FirstBatchFails, "decode error in the first batch")]
)
def test_auto_falls_back_to_the_torch_path_with_the_reason(monkeypatch, caplog, packed, dali_chosen, failing, reason):
    monkeypatch.setattr(backends, "dali_loader", failing)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        loader = shard_loader("auto", packed, batch=4)
    assert loader.name == "torch" and reason in loader.description and "torch GPU path" in loader.description
    assert any(reason in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    batches = list(loader)
    assert len(batches) == 4 and batches[0]["image"].shape[0] == 4


def test_dali_by_name_fails_loudly(monkeypatch, packed, dali_chosen):
    monkeypatch.setattr(backends, "dali_loader", BuildFails)
    with pytest.raises(RuntimeError, match="CUDA driver too old"):
        shard_loader("dali", packed, batch=4)


def test_a_working_pipeline_keeps_its_first_batch(monkeypatch, packed, dali_chosen):
    class Works(BuildFails):
        def __init__(self, source, spec):
            self.batches = [{"image": torch.full((4, 1), float(k))} for k in range(3)]

        def __len__(self) -> int:
            return 3

        def __iter__(self):
            return iter(self.batches)

    monkeypatch.setattr(backends, "dali_loader", Works)
    loader = shard_loader("auto", packed, batch=4)
    assert loader.name == "dali" and len(loader) == 3
    assert [int(b["image"][0, 0]) for b in loader] == [0, 1, 2]


def test_a_run_tries_dali_once_and_keeps_the_torch_path(monkeypatch, caplog, dali_chosen, tmp_path):
    """A phase switch and a second epoch: three loaders, one DALI attempt, one warning, one data: line."""
    from unimlip_fast.run_folder import RunFolder

    from .helpers import pack_medpix, read_metrics, run_args, run_cli

    attempts = []

    def failing(source, spec):
        attempts.append(spec.strong_views)
        raise RuntimeError("nvJPEG: CUDA driver too old (injected)")

    monkeypatch.setattr(backends, "dali_loader", failing)
    run = tmp_path / "run"
    args = [*run_args(pack_medpix(tmp_path), "auto", run), "train.max_steps=8"]  # 6 steps an epoch, SimCLR from 2
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert run_cli(monkeypatch, *args) == 0
    steps = [m for m in read_metrics(run) if "loss/total" in m]
    assert len(steps) == 8 and steps[1]["phase"] == "warmup" and steps[2]["phase"] == "simclr"
    assert attempts == [False], attempts  # the first loader only: neither the phase switch nor epoch 2 retried
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 1
    notes = RunFolder(run).notes.read_text()
    assert notes.count("DALI failed (RuntimeError: nvJPEG: CUDA driver too old (injected))") == 1, notes


def test_a_bad_packed_folder_is_its_own_error_not_a_dali_failure(monkeypatch, caplog, packed, dali_chosen):
    """What the shards themselves get wrong (here: packed at another context length) is said as it is,
    on any backend: it is not taken for DALI failing, nor hidden behind a fallback."""
    from unimlip_fast.data.records import DataError

    from .helpers import train_loader

    calls = []
    monkeypatch.setattr(backends, "dali_loader", lambda source, spec: calls.append(1))

    class PackedWithAnotherContextLength:  # the 16 records of the packed folder, 32 tokens a caption, not 24
        input_ids = np.full((16, 32), 7, dtype=np.int32)
        attention_mask = np.ones((16, 32), dtype=np.uint8)

        def __len__(self):
            return 16

    with caplog.at_level(logging.WARNING, logger=backends.__name__), pytest.raises(DataError, match="repack"):
        train_loader("auto", PackedWithAnotherContextLength(), 4, shards=packed)
    assert not calls and not any("falling back" in r.getMessage() for r in caplog.records)
