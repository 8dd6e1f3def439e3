"""Benchmark: input pipelines against the training step they feed, on MedPix shards.

Samples per second with the three 224 px views of the SimCLR phase (weak + two strong) and MLM
masking, for: the CPU loader with every core as a DataLoader worker; the torch GPU path (decode in
workers, or nvJPEG through torchvision where installed; views as batched CUDA ops); DALI on the
GPU where it imports. Then the samples per second of the training step: forward and backward of
the default-size model (ResNet-50, width 64, at 224 px; a text tower of BiomedBERT-base's shape
initialised at random; fusion and heads at their defaults), all five terms, bf16 autocast, at a
per-GPU batch of 96 (the paper's 768 on 8 GPUs) and 256 (one GPU kept busier). Targets:
the GPU path at least 4x the CPU loader and at least 2x the faster training step.

The MedPix train split (``../shared/data/medpix2``, or ``$UNIMLIP_SHARED_DATA/medpix2``) is packed
into a temporary folder first, with a WordPiece tokenizer fitted to its captions (nothing is
downloaded). One CSV row per path, with the card, versions and commit.

    python bench/bench_data.py                         # rows appended to bench/results.csv
    python bench/bench_data.py --seconds 5 --csv /tmp/data.csv

Without CUDA only the CPU loader is measured (briefly), and the output says so.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED_DATA, append_rows, environment, measure

from unimlip_fast.config import Config, DataConfig, TextConfig
from unimlip_fast.data.backends import build_train_loader
from unimlip_fast.data.dali import dali_available
from unimlip_fast.data.dataset import build_dataset
from unimlip_fast.data.masking import MaskingTables
from unimlip_fast.data.pack import PackOptions, pack
from unimlip_fast.data.shards import ShardSet, open_shards
from unimlip_fast.data.sources import read_records
from unimlip_fast.data.spec import LoaderSpec

REPO = Path(__file__).resolve().parents[1]
MEDPIX = SHARED_DATA / "medpix2"
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
IMAGE_SIZE, CONTEXT, BATCH = 224, 77, 96
TRAIN_BATCHES = (96, 256)  # per-GPU batches of the training step
REPEAT = 8  # MedPix train x 8 = 13,088 samples an epoch: start-up (workers, pipeline) is not the measure


def _tokenizer(captions: list[str], folder: Path):
    from transformers import AutoTokenizer

    from unimlip_fast.model import build_tokenizer

    build_tokenizer(TextConfig(encoder="random-bert", vocab_size=8192), captions).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def tiled(shards: ShardSet, k: int) -> ShardSet:
    """The shards listed ``k`` times over (DALI reads each listing as one more tar)."""
    n = len(shards.tars)
    samples = np.concatenate([shards.samples] * k)
    samples["shard"] += np.repeat(np.arange(k) * n, len(shards.samples)).astype(np.int32)
    return ShardSet(shards.root, shards.manifest, shards.tars * k, shards.indices * k, samples, shards.read_skipped)


def samples_per_s(loader, device: torch.device, seconds: float, warm: int) -> tuple[float, int]:
    """Samples per second drawn for ``seconds`` after ``warm`` batches (workers started, pipeline
    built, the batches prepared during start-up consumed), epoch after epoch."""
    n, start, seen = 0, None, 0
    while True:
        for batch in loader():
            seen += 1
            if seen <= warm:
                if seen == warm:  # the clock starts now
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                continue
            n += batch["image"].shape[0]
            if time.perf_counter() - start > seconds:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the views of the last batch are done
                return n / (time.perf_counter() - start), n


def synthetic_batch(tokenizer, batch: int, device: torch.device) -> dict:
    """A SimCLR-phase batch of random images and caption ids (48 tokens, 15% as MLM labels)."""
    g = torch.Generator(device=device).manual_seed(0)
    images = {
        k: torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device, generator=g)
        for k in ("image", "image_a", "image_b")
    }
    ids = torch.randint(len(tokenizer) // 4, len(tokenizer), (batch, 48), device=device, generator=g)
    ids[:, 0] = tokenizer.cls_token_id
    labels = torch.where(torch.rand(batch, 48, device=device, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    labels[:, 1] = ids[:, 1]
    return {**images, "input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_labels": labels}


def train_step_samples_per_s(
    tokenizer, device: torch.device, batches=TRAIN_BATCHES, warmup: int = 3, repeats: int = 10
) -> list[tuple[int, str, float, str]]:
    """``[(batch, status, samples/s, what)]`` of the training step at each per-GPU batch: 96 is the paper's
    global 768 on 8 GPUs; a larger one keeps one GPU busier (more samples/s, a harder target)."""
    from unimlip_fast.kernels.ops import resolve_ops
    from unimlip_fast.model import SIMCLR, build_model
    from unimlip_fast.objective import compute_terms, total_loss

    cfg = Config()  # the paper's sizes; the text tower is BiomedBERT-base's shape, initialised at random
    cfg.model.text = TextConfig(
        encoder="random-bert", vocab_size=len(tokenizer), hidden_size=768, num_layers=12, num_heads=12
    )
    model = build_model(cfg.model, cfg.loss, tokenizer).to(device).train()
    model.ops = resolve_ops("auto", device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    what = (
        "ResNet-50 224px + BERT-base-sized text (12x768), fusion 4, bf16 autocast, 5 terms, "
        f"{'fused ' if device.type == 'cuda' else ''}AdamW"
    )

    def step(data: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            terms = compute_terms(model(data, SIMCLR), cfg.loss, model.ops)
            loss = total_loss(terms, cfg.loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = []
    for batch in batches:
        m = measure(
            functools.partial(step, synthetic_batch(tokenizer, batch, device)), device, warmup=warmup, repeats=repeats
        )
        value = batch / (m.median_ms / 1e3) if m.status == "ok" else float("nan")
        note = what if m.status == "ok" else f"{m.status}; {what}"
        if m.peak_extra_mib is not None:
            note += f"; peak {m.peak_extra_mib / 1024:.0f} GiB"
        results.append((batch, m.status, value, note))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run(
    csv_path: str | Path = DEFAULT_CSV, seconds: float = 10.0, workers: int | None = None, smoke: bool = False
) -> list[dict]:
    """``smoke``: every input path on the CPU (the torch and DALI code paths without a GPU), no
    training step; numbers that say nothing about a GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    workers = workers or os.cpu_count() or 1
    if not MEDPIX.is_dir():
        raise SystemExit(
            f"MedPix not found at {MEDPIX} (../shared/data beside the repository, or "
            f"$UNIMLIP_SHARED_DATA; bench/gpu_carry.sh carries it to a GPU machine)"
        )
    env = environment(device)
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = "not installed"
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = "not installed"
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows: list[dict] = []

    def row(path: str, value: float, note: str, status: str = "ok", batch: int = BATCH) -> None:
        r = {
            "bench": "data",
            "time": stamp,
            "path": path,
            "status": status,
            "samples_per_s": round(value, 1) if value == value else "",
            "batch": batch,
            "image_size": IMAGE_SIZE,
            "views": 3,
            "workers": workers,
            "cpus": os.cpu_count(),
            "note": note,
            **env,
        }
        rows.append(r)
        append_rows(csv_path, [r])
        print(f"{path:12s} {r['samples_per_s']!s:>10} samples/s  {status}  {note}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = DataConfig(format="medpix", path=str(MEDPIX))
        records = read_records(data, "train")
        tokenizer = _tokenizer([r.caption for r in records.items], tmp / "tokenizer")
        t0 = time.time()
        pack(
            data,
            tmp / "shards",
            str(tmp / "tokenizer"),
            "train",
            PackOptions(shard_size=256, context_length=CONTEXT, workers=workers, progress=False),
        )
        print(f"packed {len(records)} MedPix pairs in {time.time() - t0:.1f} s ({workers} processes)", flush=True)
        shards = tiled(open_shards(tmp / "shards"), REPEAT)
        dataset = build_dataset(records.items * REPEAT, tokenizer, IMAGE_SIZE, CONTEXT)
        mlm = MaskingTables.from_tokenizer(tokenizer)
        epoch = [0]

        def make(backend: str, dtype=torch.float32):
            def loader():
                epoch[0] += 1
                spec = LoaderSpec(
                    BATCH,
                    IMAGE_SIZE,
                    seed=0,
                    epoch=epoch[0],
                    strong_views=True,
                    mlm=mlm,
                    num_workers=workers,
                    device=device,
                    dtype=dtype,
                )
                return build_train_loader(backend, dataset, spec, shards=None if backend == "cpu" else shards)

            return loader

        cpu_seconds = seconds if device.type == "cuda" or smoke else min(seconds, 5.0)
        warm = max(2, workers + 1)
        cpu, _ = samples_per_s(make("cpu"), torch.device("cpu"), cpu_seconds, warm)
        row("cpu_loader", cpu, f"PIL decode + views in {workers} DataLoader workers")
        if device.type != "cuda" and not smoke:
            print("no CUDA device: the torch GPU path, DALI and the training step were not measured")
            return rows
        torch_gpu, _ = samples_per_s(make("torch", torch.bfloat16), device, seconds, warm)
        has_tv = env["torchvision"] != "not installed"
        decode = "nvJPEG via torchvision" if has_tv else "PIL in workers (no torchvision)"
        row("torch_gpu", torch_gpu, f"{decode}; views as batched {device.type} ops; bf16")
        if dali_available():
            dali_gpu, _ = samples_per_s(make("dali", torch.bfloat16), device, seconds, warm)
            row(
                "dali_gpu",
                dali_gpu,
                "mixed (nvJPEG) decode, GPU views; bf16" if device.type == "cuda" else "CPU operators (smoke run)",
            )
        else:
            dali_gpu = float("nan")
            row("dali_gpu", dali_gpu, "DALI not installed: the torch GPU path is the GPU number", status="skipped")
        if smoke:
            print("smoke run: every path ran on the CPU; no training step")
            return rows
        steps = train_step_samples_per_s(tokenizer, device)
        for batch, status, value, note in steps:
            row(f"train_step_{batch}", value, note, status, batch)
    best = max(v for v in (torch_gpu, dali_gpu) if v == v)
    step = max((v for _, _, v, _ in steps if v == v), default=float("nan"))
    print(
        f"GPU path / CPU loader: {best / cpu:.1f}x (target >= 4x); GPU path / fastest training step "
        f"({step:.0f} samples/s): {best / step:.1f}x (target >= 2x)"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV file the rows are appended to")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per input pipeline")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers / DALI threads (0: every core)")
    parser.add_argument("--smoke", action="store_true", help="every input path on the CPU, no training step")
    args = parser.parse_args(argv)
    run(args.csv, args.seconds, args.workers or None, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
