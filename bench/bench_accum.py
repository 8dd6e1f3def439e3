"""Benchmark: contrastive-exact gradient accumulation, the memory it saves and the forward it costs.

One training step (all five terms, the SimCLR phase: weak view + two strong views, MLM on) through
DeepSpeed at a fixed global batch, with the batch run whole (micro-batch = batch: the step without
accumulation, the reference) and in smaller micro-batches. Per row: samples/s of the step, its
peak memory above what the process held before the first step, and the extra forward's cost
(the first, autograd-free pass over every micro-batch: its samples/s and its share of the step).

- CPU (default): the CPU recipe's model (configs/medpix_cpu.yaml: 32-wide modified ResNet at 96 px,
  MiniLM text tower) at global batch 768, micro-batches 768, 256, 96, 32, fp32, on MedPix train
  images (phantom ones where MedPix is absent). Each micro-batch size runs in its own process and
  the memory is that process's peak resident set above its size before the first step.
- ``--gpu``: the paper's model (ResNet-50 at 224 px, a text tower of BiomedBERT-base's shape
  initialised at random, bf16 autocast, the fused kernels) on one GPU at global batch 768 with
  micro-batches of 768 and 96; then, with micro-batches of 96, the global batch doubles from 768
  until it runs out of memory or out of ``--budget`` seconds: the largest batch one GPU reaches,
  which is what each of 8 GPUs holds when 8 x 96 micro-batches make a global batch 8 times larger.
  Peak memory from the CUDA allocator.

    nice -n 5 python bench/bench_accum.py                    # CPU rows appended to bench/results.csv
    python bench/bench_accum.py --gpu --csv /tmp/accum.csv --budget 150
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, SHARED_DATA, Measurement, append_rows, environment, measure

DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
GLOBAL_BATCH = 768
CPU_MICRO_BATCHES = (768, 256, 96, 32)
GPU_MICRO_BATCHES = (768, 96)


def _config(gpu: bool, global_batch: int, micro: int):
    from unimlip_fast.config import TextConfig, load_config

    overrides = [f"train.batch_size={global_batch}", f"train.micro_batch_size={micro}", "train.grad_clip=1.0"]
    if gpu:  # the paper's sizes; the text tower has BiomedBERT-base's shape, initialised at random
        cfg = load_config(REPO / "configs/paper.yaml", overrides + ["model.kernels=triton"])
        cfg.model.text = TextConfig(
            encoder="random-bert", vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, context_length=77
        )
        return cfg
    medpix = SHARED_DATA / "medpix2"
    data = [f"data.path={medpix}"] if medpix.is_dir() else ["data.format=phantom", f"data.phantom_size={global_batch}"]
    return load_config(REPO / "configs/medpix_cpu.yaml", overrides + data + ["data.num_workers=2"])


def _one_batch(cfg, tokenizer, device: torch.device, loaded: int = GLOBAL_BATCH) -> dict:
    """A SimCLR-phase batch of ``train.batch_size``: ``loaded`` samples from the recipe's data through
    the CPU loader, repeated on the device up to the size (the content does not change the cost)."""
    from unimlip_fast.data.backends import build_train_loader
    from unimlip_fast.data.dataset import build_dataset
    from unimlip_fast.data.masking import MaskingTables
    from unimlip_fast.data.sources import read_records
    from unimlip_fast.data.spec import LoaderSpec, trim_padding

    records = read_records(cfg.data, cfg.data.split).items
    n = min(loaded, cfg.train.batch_size)
    records = (records * (n // len(records) + 1))[:n]
    dataset = build_dataset(records, tokenizer, cfg.model.image_size, cfg.model.text.context_length)
    spec = LoaderSpec(
        n,
        cfg.model.image_size,
        strong_views=True,
        mlm=MaskingTables.from_tokenizer(tokenizer),
        mlm_prob=cfg.loss.mlm_prob,
        num_workers=cfg.data.num_workers,
    )
    loader = build_train_loader("cpu", dataset, spec)
    batch = next(iter(loader))
    batch.pop("skipped", None)
    return tile({k: v.to(device) for k, v in trim_padding(batch).items()}, cfg.train.batch_size)


def tile(batch: dict, n: int) -> dict:
    """The batch repeated (and cut) to ``n`` rows."""
    have = next(iter(batch.values())).shape[0]
    if have == n:
        return batch
    return {k: v.repeat(-(-n // have), *[1] * (v.dim() - 1))[:n] for k, v in batch.items()}


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(gpu: bool, plan: list[tuple[int, int]], warmup: int, repeats: int, budget: float) -> None:
    """In this process, one engine for every (global batch, micro-batch) of ``plan``: one JSON line
    each. With more than one, the next is skipped when it would not end within ``budget`` seconds,
    and an out-of-memory ends the list. On the CPU the memory is the process's resident-set peak:
    one entry per process there."""
    import dataclasses

    import deepspeed

    from unimlip_fast.kernels.ops import resolve_ops
    from unimlip_fast.model import SIMCLR, build_model, build_tokenizer
    from unimlip_fast.objective import compute_terms, total_loss
    from unimlip_fast.train.accumulate import build_accumulator
    from unimlip_fast.train.distributed import init_distributed
    from unimlip_fast.train.ds_config import fp32_variant, load_ds_config, resolve_ds_config
    from unimlip_fast.train.schedule import build_optimizer

    started = time.perf_counter()
    env = init_distributed()
    torch.manual_seed(0)
    cfg = _config(gpu, *plan[0])
    captions = None
    if gpu:
        from unimlip_fast.data.sources import read_records

        medpix = SHARED_DATA / "medpix2"
        if medpix.is_dir():
            cfg.data.format, cfg.data.path = "medpix", str(medpix)
        else:
            cfg.data.format, cfg.data.phantom_size = "phantom", 2048
        cfg.data.num_workers = min(8, os.cpu_count() or 1)
        captions = [r.caption for r in read_records(cfg.data, "train").items]
    tokenizer = build_tokenizer(cfg.model.text, captions)
    if gpu:
        with tempfile.TemporaryDirectory() as tmp:  # a fast tokenizer that pickles into loader workers
            from transformers import AutoTokenizer

            tokenizer.save_pretrained(tmp)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    model = build_model(cfg.model, cfg.loss, tokenizer)
    model.ops = resolve_ops(cfg.model.kernels, env.device)
    ds = resolve_ds_config(
        load_ds_config(str(REPO / "configs" / ("zero2.json" if gpu else "zero2_fp32.json"))), cfg, env.world_size
    )
    ds = ds if gpu else fp32_variant(ds)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.train, env.device), config=ds, dist_init_required=False
    )
    engine.train()
    first = _one_batch(cfg, tokenizer, env.device)
    last_wall, searching = 0.0, len(plan) > 1
    for global_batch, micro in plan:
        if global_batch > GLOBAL_BATCH and (not searching or time.perf_counter() - started + 3 * last_wall > budget):
            searching = False  # out of memory or of time: the batch below is the largest
            continue
        train = dataclasses.replace(cfg.train, batch_size=global_batch, micro_batch_size=micro)
        cfg = dataclasses.replace(cfg, train=train)
        engine.set_train_micro_batch_size(micro)
        engine.set_train_batch_size(global_batch)
        accumulator = build_accumulator(engine, cfg, model.ops, env.world_size, env.device)
        batch = tile(first, global_batch)

        def step(batch=batch, accumulator=accumulator, cfg=cfg) -> None:  # this iteration's, bound
            if accumulator is None:
                loss = total_loss(compute_terms(engine(batch, SIMCLR), cfg.loss, model.ops), cfg.loss)
                engine.backward(loss)
            else:
                accumulator.forward(batch, SIMCLR)
                accumulator.backward()
            engine.step()

        rss_before = _rss_mib()
        t0 = time.perf_counter()
        try:
            for _ in range(warmup):
                step()
        except torch.OutOfMemoryError:
            m = Measurement("OOM")
        else:
            if accumulator is not None:
                accumulator.flush()  # the warm-up's timings dropped
            m = measure(step, env.device, warmup=0, repeats=repeats)
        last_wall = time.perf_counter() - t0
        result = {"global_batch": global_batch, "micro_batch": micro, "status": m.status, "wall_s": round(last_wall, 1)}
        if m.status == "ok":
            result["samples_per_s"] = round(global_batch / (m.median_ms / 1e3), 2)
            if env.device.type == "cuda":
                result["peak_extra_mib"] = round(m.peak_extra_mib)
            else:  # the process's peak resident set above what it held before the first step
                result["peak_extra_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
            if accumulator is not None:
                extra = accumulator.flush()
                result["extra_forward_samples_per_s"] = round(extra["accum/extra_forward_samples_per_s"], 2)
                result["extra_forward_share"] = round(extra["accum/extra_forward_share"], 3)
        print(json.dumps(result), flush=True)
        del batch, step  # step holds this iteration's batch too
        if m.status != "ok":
            engine.zero_grad()
            searching = searching and global_batch <= GLOBAL_BATCH  # the whole batch may not fit: search on
        if env.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_child(gpu: bool, plan: list[tuple[int, int]], warmup: int, repeats: int, budget: float):
    """Yields each result as the child prints it (a run cut short by a timeout keeps its rows)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        ",".join(f"{g}x{m}" for g, m in plan),
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
        "--budget",
        str(budget),
    ] + (["--gpu"] if gpu else [])
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "TOKENIZERS_PARALLELISM": "false"}
    seen = 0
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        for line in proc.stdout:
            if line.startswith("{"):
                seen += 1
                yield json.loads(line)
        code = proc.wait()
        if code != 0:
            err.seek(0)
            tail = err.read().strip().splitlines()[-1:] or ["no output"]
            global_batch, micro = plan[min(seen, len(plan) - 1)]
            yield {"global_batch": global_batch, "micro_batch": micro, "status": f"failed: {tail[0][:200]}"}


def run(
    csv_path: str | Path,
    gpu: bool,
    warmup: int,
    repeats: int,
    budget: float,
    global_batch: int = GLOBAL_BATCH,
    micro_batches: tuple[int, ...] = CPU_MICRO_BATCHES,
) -> list[dict]:
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    env = environment(device)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    what = (
        "paper model (ResNet-50 224 px, 12x768 text), bf16 autocast, fused kernels"
        if gpu
        else "CPU recipe's model (configs/medpix_cpu.yaml), fp32, "
        + ("MedPix" if (SHARED_DATA / "medpix2").is_dir() else "phantom")
        + " images"
    )
    rows, reference = [], {}
    started = time.time()

    def record(result: dict) -> None:
        if result["micro_batch"] == result["global_batch"] and result["status"] == "ok":
            reference.update(result)
        ratio = (
            result["samples_per_s"] / reference["samples_per_s"]
            if reference and result.get("samples_per_s") and result["global_batch"] == reference["global_batch"]
            else None
        )
        row = {
            "bench": "accum",
            "time": stamp,
            **{
                k: result.get(k, "")
                for k in (
                    "global_batch",
                    "micro_batch",
                    "status",
                    "samples_per_s",
                    "peak_extra_mib",
                    "extra_forward_samples_per_s",
                    "extra_forward_share",
                )
            },
            "vs_whole_batch": round(ratio, 3) if ratio else "",
            "note": what,
            **env,
        }
        rows.append(row)
        append_rows(csv_path, [row])
        print(json.dumps({k: row[k] for k in list(row)[2:11]}), flush=True)

    if gpu:  # 768 whole, then micro-batches of 96 doubling the batch from 768 until out of memory or time
        plan = [(GLOBAL_BATCH, GLOBAL_BATCH)] + [(GLOBAL_BATCH * 2**i, 96) for i in range(8)]
        results = []
        for result in _run_child(gpu, plan, warmup, repeats, budget):
            results.append(result)
            record(result)
        reached = max(
            (r["global_batch"] for r in results if r["status"] == "ok" and r["micro_batch"] == 96), default=None
        )
        print(
            f"largest global batch in micro-batches of 96 on one GPU: {reached} (each of 8 GPUs holding that "
            f"many: {8 * reached if reached else None})"
        )
    else:
        for micro in micro_batches:
            for result in _run_child(gpu, [(global_batch, micro)], warmup, repeats, budget):
                record(result)
    print(f"{len(rows)} rows in {time.time() - started:.0f} s -> {csv_path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV file the rows are appended to")
    parser.add_argument("--gpu", action="store_true", help="the paper's model on a CUDA device")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the clock starts")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps (the median is reported)")
    parser.add_argument(
        "--budget", type=float, default=900.0, help="seconds per micro-batch size on the CPU; in all with --gpu"
    )
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH, help="CPU: the global batch")
    parser.add_argument(
        "--micro-batches",
        default=",".join(map(str, CPU_MICRO_BATCHES)),
        help="CPU: the micro-batch sizes, the whole batch first",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        plan = [tuple(map(int, item.split("x"))) for item in args.child.split(",")]
        child(args.gpu, plan, args.warmup, args.repeats, args.budget)
        return 0
    run(
        args.csv,
        args.gpu,
        args.warmup,
        args.repeats,
        args.budget,
        args.global_batch,
        tuple(int(m) for m in args.micro_batches.split(",")),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
