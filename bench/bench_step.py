"""Benchmark: the full phase-2 training step, reference against fast, on the same batch.

Both run the SimCLR phase's whole objective (five terms; the weak view and two strong views; MLM)
from the same weights on the same MedPix batch:

- ``reference``: fp32 weights, bf16 autocast (fp32 on a CPU), eager, reference losses, NCHW, SDPA's
  math backend, torch's unfused AdamW.
- ``fast``: the trainer's own path: ``train.fast=true`` (channels-last, torch.compile of the image
  trunk and the text tower, fused SDPA, fused AdamW), ``model.kernels=auto`` (Triton on sm_80+),
  DeepSpeed ZeRO-2 from ``--ds-config`` (default ``configs/zero2_bf16.json``: bf16 weights; a CPU
  run replaces it with fp32, as the trainer does).

First the five losses of one forward are compared (DropBlock, the text-embedding dropout and
BERT's dropout off for that pass, so both draw nothing at random). Then, per path and per-GPU
batch: samples/s (median step), the fast/reference ratio, the time by stage (data, forward,
backward, optimizer; device events on CUDA), peak memory, FLOPs per sample (torch's FLOP counter
over the reference's forward and backward: matrix products, convolutions, attention) and model
FLOPs utilisation against a matrix-multiply peak measured in the same run (bf16 on CUDA; fp32 on a
CPU, which the rows say). Two feeds: ``batch`` (one batch resident on the device: the step alone)
and ``data`` (the input pipeline from MedPix shards: the torch GPU path on CUDA, the CPU loader on a
CPU), so the second figure includes input. The first fast step compiles; its time is reported
apart (``first_step_s``), never inside samples/s.

On CUDA the model is the paper's (ResNet-50 at 224 px, a BERT-base-sized text tower with a WordPiece
vocabulary fitted to MedPix, fusion 4 x 768), both paths at the paper's per-GPU batch (96 = 768 / 8),
then the fast path at larger batches until one does not fit (``--batches 96,max``; ``--budget``
skips what does not fit in the time). On a CPU, a small model (``--model small``), and the rows
say CPU. One CSV row per result, with versions and commit.

    python bench/bench_step.py                                  # rows appended to bench/results.csv
    python bench/bench_step.py --model small --batches 16 --repeats 3 --csv /tmp/step.csv
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, SHARED_DATA, StageClock, append_rows, environment, matmul_peak_tflops

from unimlip_fast.config import Config, DataConfig, TextConfig, load_config
from unimlip_fast.data.backends import build_train_loader
from unimlip_fast.data.dataset import build_dataset
from unimlip_fast.data.masking import MaskingTables
from unimlip_fast.data.sources import read_records
from unimlip_fast.data.spec import LoaderSpec, trim_padding
from unimlip_fast.kernels.ops import REFERENCE_OPS, resolve_ops
from unimlip_fast.model import SIMCLR, build_model, build_tokenizer
from unimlip_fast.objective import compute_terms, total_loss
from unimlip_fast.train.fast import REFERENCE_STEP, apply_fast, resolve_fast

MEDPIX = SHARED_DATA / "medpix2"
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
CONTEXT = 77
STAGES = ("data", "forward", "backward", "optimizer")
MAX_CANDIDATES = (128, 192, 256, 384, 512, 768)  # tried in turn for "max" until one does not fit
MODELS = {
    # The paper's: ResNet-50 (width 64) at 224 px; a BERT-base-shaped text tower; fusion and heads at their defaults.
    "paper": ["model.text.hidden_size=768", "model.text.num_layers=12", "model.text.num_heads=12"],
    # A CPU-sized stand-in: the same architecture, narrower and shallower, at 64 px.
    "small": [
        "model.image_size=64",
        "model.vision_layers=[1,1,1,1]",
        "model.vision_width=32",
        "model.embed_dim=128",
        "model.text.hidden_size=128",
        "model.text.num_layers=2",
        "model.text.num_heads=4",
        "model.fusion_layers=1",
        "model.fusion_heads=4",
        "model.simclr_hidden=512",
        "model.simclr_out=64",
    ],
}
MODEL_NOTES = {
    "paper": "ResNet-50 224px + BERT-base-sized text (12x768), fusion 4x768",
    "small": "small CPU model: ResNet [1,1,1,1] width 32 at 64px, text 2x128, fusion 1x128",
}


def bench_config(model: str, vocab_size: int, batch: int, overrides: list[str]) -> Config:
    return load_config(
        None,
        MODELS[model]
        + overrides
        + [
            "model.text.encoder=random-bert",
            f"model.text.vocab_size={vocab_size}",
            f"model.text.context_length={CONTEXT}",
            "model.text.hidden_dropout=0.0",  # in both paths: BERT's dropout would draw differently inside the compile
            f"train.batch_size={batch}",
            "train.fast=true",
            "train.warmup_steps=1",
            "train.max_steps=1000",
        ],
    )


def set_perturbations(model, cfg: Config, on: bool) -> None:
    """DropBlock and the text-embedding dropout at their configured rates, or off (the loss comparison)."""
    model.cfg.dropblock_p = cfg.model.dropblock_p if on else 0.0
    model.cfg.text_dropout = cfg.model.text_dropout if on else 0.0


class Reference:
    """fp32 weights, bf16 autocast on CUDA, eager, reference losses, NCHW, SDPA's math backend, torch AdamW."""

    name = "reference"

    def __init__(self, model, cfg: Config, device: torch.device):
        self.model, self.cfg, self.device = model.to(device).train(), cfg, device
        apply_fast(self.model, REFERENCE_STEP)
        self.model.ops = REFERENCE_OPS
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.train.lr,
            betas=tuple(cfg.train.betas),
            eps=cfg.train.eps,
            weight_decay=cfg.train.weight_decay,
        )

    def forward(self, batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            terms = compute_terms(self.model(batch, SIMCLR), self.cfg.loss, self.model.ops)
            return terms, total_loss(terms, self.cfg.loss)

    def step(self, batch, clock: StageClock) -> None:
        _, loss = self.forward(batch)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")

    def release(self) -> None:
        self.model.cpu()
        self.optimizer.state.clear()


class Fast:
    """The trainer's path: train.fast=true, model.kernels=auto, DeepSpeed (as train/engine.py builds it)."""

    name = "fast"

    def __init__(self, model, cfg: Config, device: torch.device, ds_config: str):
        from unimlip_fast.train.distributed import init_distributed
        from unimlip_fast.train.engine import deepspeed_engine

        env = init_distributed()
        self.cfg, self.device = cfg, device
        self.choices = resolve_fast(cfg.train, device)
        model.ops = resolve_ops("auto", device)
        apply_fast(model, self.choices)
        self.engine, self.ds = deepspeed_engine(
            model, cfg, ds_config, env, cfg.train.max_steps, fused_adamw=self.choices.fused_adamw
        )
        self.model = self.engine.module
        self.engine.train()

    def forward(self, batch):
        terms = compute_terms(self.engine(batch, SIMCLR), self.cfg.loss, self.model.ops)
        return terms, total_loss(terms, self.cfg.loss)

    def step(self, batch, clock: StageClock) -> None:
        _, loss = self.forward(batch)
        clock.mark("forward")
        self.engine.backward(loss)
        clock.mark("backward")
        self.engine.step()  # its gradient-norm read is the step's one host sync
        clock.mark("optimizer")


def count_flops_per_sample(path: Reference, batch: dict) -> float:
    """torch's FLOP counter over the reference's forward and backward (matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _, loss = path.forward(batch)
        loss.backward()
    path.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["image"].shape[0]


def run_steps(path, next_batch, device: torch.device, warmup: int, repeats: int) -> dict:
    """Warm-up (the first step timed apart: it compiles), then ``repeats`` steps timed by stage."""
    clock = StageClock(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup):
        clock.start()
        path.step(next_batch(), clock)
        if i == 0:
            sync()
            first_step_s = time.perf_counter() - t0
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    totals = []
    for _ in range(repeats):
        clock.start()
        batch = next_batch()
        clock.mark("data")
        path.step(batch, clock)
        times = clock.times_ms()
        for stage in STAGES:
            per_stage[stage].append(times[stage])
        totals.append(sum(times.values()))
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's, lifetime
    return {
        "step_ms": statistics.median(totals),
        "first_step_s": first_step_s,
        "peak_gib": peak_gib,
        **{f"{s}_ms": statistics.median(v) for s, v in per_stage.items()},
    }


def untouched_terms(path, batch: dict, cfg: Config) -> dict[str, float]:
    """The five terms of one forward before any step, DropBlock and dropout off (nothing drawn at random)."""
    set_perturbations(path.model, cfg, on=False)
    try:
        terms, _ = path.forward(batch)  # with autograd, as the step runs (and compiles) it
        return {k: float(v.detach()) for k, v in terms.items()}
    finally:
        set_perturbations(path.model, cfg, on=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV file the rows are appended to")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="paper (default on CUDA) or small (CPU)")
    parser.add_argument(
        "--batches",
        default=None,
        help="per-GPU batches, 'max' = the largest that fits (default 96,max on CUDA, 16 on a CPU)",
    )
    parser.add_argument("--ds-config", default=str(REPO / "configs" / "zero2_bf16.json"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--feeds", default="batch,data", help="batch (resident batch) and/or data (input pipeline)")
    parser.add_argument("--workers", type=int, default=0, help="input workers (0: every core)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.compile=false to measure without one speed-up",
    )
    parser.add_argument("--budget", type=float, default=0, help="seconds; later rows are skipped past it (0: none)")
    args = parser.parse_args(argv)
    started = time.time()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    model_name = args.model or ("paper" if cuda else "small")
    batches = (args.batches or ("96,max" if cuda else "16")).split(",")
    feeds = args.feeds.split(",")
    workers = args.workers or os.cpu_count() or 1
    if not MEDPIX.is_dir():
        raise SystemExit(
            f"MedPix not found at {MEDPIX} (../shared/data beside the repository, or $UNIMLIP_SHARED_DATA)"
        )
    env = environment(device)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak_tflops(device, peak_dtype, 8192 if cuda else 2048, repeats=5 if cuda else 10)
    peak_kind = "bf16 matmul" if cuda else "fp32 matmul (CPU)"
    print(f"{peak_kind} peak measured: {peak:.3g} TFLOP/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = DataConfig(format="medpix", path=str(MEDPIX))
        records = read_records(data, "train").items
        tokenizer = build_tokenizer(TextConfig(encoder="random-bert", vocab_size=8192), [r.caption for r in records])
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        base_cfg = bench_config(model_name, len(tokenizer), int(batches[0]), args.set)
        image_size = base_cfg.model.image_size
        shards = None
        if "data" in feeds and cuda:
            from unimlip_fast.data.pack import PackOptions, pack

            pack(
                data,
                tmp / "shards",
                str(tmp / "tokenizer"),
                "train",
                PackOptions(shard_size=256, context_length=CONTEXT, workers=workers, progress=False),
            )
            shards = tmp / "shards"
        dataset = build_dataset(records, tokenizer, image_size, CONTEXT)
        mlm = MaskingTables.from_tokenizer(tokenizer)

        def loader(batch_size: int, dtype: torch.dtype, epoch: int = 0):
            spec = LoaderSpec(
                batch_size,
                image_size,
                seed=0,
                epoch=epoch,
                strong_views=True,
                mlm=mlm,
                num_workers=workers if cuda else min(workers, 2),
                device=device,
                dtype=dtype,
            )
            return build_train_loader("torch" if cuda else "cpu", dataset, spec, shards=shards)

        def endless(batch_size: int, dtype: torch.dtype):
            epoch = 0
            while True:
                for batch in loader(batch_size, dtype, epoch):
                    batch.pop("skipped", None)
                    yield {k: v.to(device, non_blocking=True) for k, v in trim_padding(batch).items()}
                epoch += 1

        torch.manual_seed(0)
        base = build_model(base_cfg.model, base_cfg.loss, tokenizer)
        reference = Reference(copy.deepcopy(base), base_cfg, device)
        first = int(batches[0])
        fixed_at = {first: next(endless(first, torch.float32))}
        # Per sample, at the first batch: the B x B contrastive logits add well under 0.1% at other batches.
        flops_per_sample = count_flops_per_sample(reference, fixed_at[first])
        reference_terms = untouched_terms(reference, fixed_at[first], base_cfg)  # before the reference's steps
        notes = (
            f"{MODEL_NOTES[model_name]}; {'CUDA' if cuda else 'CPU'}; SimCLR phase, 5 terms, 3 views at "
            f"{image_size}px, context {CONTEXT}; reference: {'bf16 autocast' if cuda else 'fp32'}, eager"
        )
        rows, rates = [], {}
        worst = float("nan")

        def row(path, feed: str, batch: int, result: dict | None, status: str = "ok") -> None:
            r = {
                "bench": "step",
                "time": stamp,
                "device": "CUDA" if cuda else "CPU",
                "model": model_name,
                "path": path.name,
                "feed": feed,
                "batch": batch,
                "status": status,
            }
            if result:
                sps = batch / (result["step_ms"] / 1e3)
                rates[(path.name, feed, batch)] = sps
                other = rates.get(("reference", feed, batch))
                r.update(
                    {
                        "samples_per_s": round(sps, 1),
                        "ratio_vs_reference": round(sps / other, 2) if path.name == "fast" and other else "",
                        **{k: round(result[k], 1) for k in ("step_ms", *(f"{s}_ms" for s in STAGES))},
                        "first_step_s": round(result["first_step_s"], 1),
                        "peak_gib": round(result["peak_gib"], 2),
                        "gflops_per_sample": round(flops_per_sample / 1e9, 1),
                        "mfu_pct": round(100 * flops_per_sample * sps / 1e12 / peak, 1),
                        "matmul_peak_tflops": float(f"{peak:.3g}"),
                        "peak_kind": peak_kind,
                        "loss_max_rel_diff": f"{worst:.1e}" if path.name == "fast" else "",
                    }
                )
            r["note"] = notes + (f"; fast: {path.note}" if path.name == "fast" else "")
            r.update(env)
            rows.append(r)
            append_rows(args.csv, [r])
            shown = {
                k: r[k]
                for k in (
                    "path",
                    "feed",
                    "batch",
                    "status",
                    "samples_per_s",
                    "ratio_vs_reference",
                    "data_ms",
                    "forward_ms",
                    "backward_ms",
                    "optimizer_ms",
                    "peak_gib",
                    "mfu_pct",
                    "first_step_s",
                )
                if k in r
            }
            print("  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

        def over_budget() -> bool:
            return bool(args.budget) and time.time() - started > args.budget

        def measure(path, batch_size: int, dtype: torch.dtype) -> bool:
            """Both feeds for one path at one batch; False when it does not fit."""
            try:
                if batch_size not in fixed_at:
                    fixed_at[batch_size] = next(endless(batch_size, torch.float32))
                resident = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in fixed_at[batch_size].items()}
                for feed in feeds:
                    if over_budget():
                        row(path, feed, batch_size, None, "skipped: time budget")
                        continue
                    source = (lambda: resident) if feed == "batch" else endless(batch_size, dtype).__next__
                    row(path, feed, batch_size, run_steps(path, source, device, args.warmup, args.repeats))
            except torch.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                row(path, "batch", batch_size, None, "OOM")
                return False
            return True

        def sweep(path, dtype: torch.dtype, grow: bool) -> None:
            """The listed batches, then (``grow`` and "max") larger ones until one does not fit."""
            for b in (int(b) for b in batches if b != "max"):
                measure(path, b, dtype)
            if grow and "max" in batches:
                for b in MAX_CANDIDATES:
                    if b > int(batches[0]) and (over_budget() or not measure(path, b, dtype)):
                        break

        # The reference first, then the fast path with the reference's weights parked on the host (DeepSpeed
        # owns the fast path's buffers, which cannot move): each path's peak memory is its own.
        sweep(reference, torch.float32, grow=False)  # the ratio is taken at the listed batches
        reference.release()
        if cuda:
            torch.cuda.empty_cache()
        fast = Fast(base, base_cfg, device, args.ds_config)
        fast.note = (
            f"{fast.choices.note(True, device).removeprefix('fast: ')}, kernels {fast.model.ops.name}, "
            f"DeepSpeed {Path(args.ds_config).stem}" + ("" if cuda else " as fp32 (CPU)")
        )
        t0 = time.perf_counter()
        fast_terms = untouched_terms(fast, fixed_at[first], base_cfg)  # from the same initial weights
        print(f"first fast forward (it compiles, with train.compile): {time.perf_counter() - t0:.1f} s", flush=True)
        worst = max(abs(fast_terms[k] - r) / max(abs(r), 1e-6) for k, r in reference_terms.items())
        compared = ", ".join(f"{k} {r:.4f}/{fast_terms[k]:.4f}" for k, r in reference_terms.items())
        print(f"losses, one forward, reference / fast: {compared}; largest relative difference {worst:.2e}", flush=True)
        sweep(fast, next(fast.model.parameters()).dtype, grow=True)
    for (name, feed, b), sps in rates.items():
        if name == "fast" and ("reference", feed, b) in rates:
            print(f"fast / reference, {feed} feed, batch {b}: {sps / rates[('reference', feed, b)]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
