"""Contrastive-exact gradient accumulation through DeepSpeed against the whole batch at once.

Each rank's batch of 8 runs as 4 micro-batches of 2 (train.micro_batch_size=2), all five terms on,
in the SimCLR phase (the image encoder's BatchNorm statistics frozen; the SimCLR head's BatchNorm
in eval mode too, so no statistic depends on the batch). Two references, plain PyTorch:
- dropout, BERT's dropout and DropBlock off: the model once over the whole batch;
- all three on: the same micro-batches forward with autograd from the same seed (the draws then
  match), their features concatenated, the terms over all of them and one backward. A single
  forward over the batch draws its masks in another order, and DropBlock normalises by the kept
  fraction of the whole map, so it is not the same random function; this is the batch's loss for
  the draws the accumulated step made.
Loss terms and every parameter's gradient (averaged over ranks as DeepSpeed does) must agree to a
relative 1e-5, under ZeRO-2 and ZeRO-3, on one process and on two gloo ranks.
"""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.config import ConfigError, load_config
from unimlip_fast.kernels.ops import resolve_ops
from unimlip_fast.model import SIMCLR, WARMUP, build_model, build_tokenizer
from unimlip_fast.objective import compute_terms, total_loss
from unimlip_fast.train.accumulate import micro_batch_plan, split_batch
from unimlip_fast.train.distributed import init_distributed
from unimlip_fast.train.ds_config import fp32_variant, resolve_ds_config
from unimlip_fast.train.fast import REFERENCE_STEP, apply_fast

from .helpers import CAPTIONS, REPO, TINY_OVERRIDES, spawn_ranks

PER_RANK, MICRO, SEED = 8, 2, 123
RANDOMNESS_OFF = ["model.dropblock_p=0.0", "model.text_dropout=0.0", "model.text.hidden_dropout=0.0"]


def make_everything(
    world: int, deterministic: bool, device: str = "cpu", kernels: str = "reference", overrides: tuple[str, ...] = ()
):
    """The same config, model (with realistic frozen statistics) and global batch in every process."""
    cfg = load_config(
        None,
        TINY_OVERRIDES
        + [f"train.batch_size={PER_RANK * world}", f"train.micro_batch_size={MICRO}", "train.grad_clip=0.0"]
        + (RANDOMNESS_OFF if deterministic else [])
        + [f"model.kernels={kernels}", *overrides],
    )
    tokenizer = build_tokenizer(cfg.model.text, CAPTIONS)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, tokenizer)
    for m in model.text.encoder.modules():  # BERT's 0.02 init maps every caption to nearly one [CLS] state
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    g = torch.Generator().manual_seed(1)
    smooth = lambda n: F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=64, mode="bilinear")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:  # running statistics of one batch exactly: the features of a fresh model then differ
        m.momentum = 1.0
    with torch.no_grad():
        warm = make_batch(smooth(32), tokenizer, n=32)
        model.train()(warm, WARMUP)  # the image encoder's statistics
        model(dict(warm, image_a=smooth(32), image_b=smooth(32)), SIMCLR)  # the SimCLR head's
    for m in norms:
        m.momentum = 0.1
    n = PER_RANK * world
    batch = make_batch(smooth(n), tokenizer, n)
    batch.update(image_a=smooth(n), image_b=smooth(n))
    model.ops = resolve_ops(cfg.model.kernels, torch.device(device))
    return cfg, model.to(device), {k: v.to(device) for k, v in batch.items()}


def make_batch(images: torch.Tensor, tokenizer, n: int) -> dict:
    """n captions from across CAPTIONS, 1 to 3 tokens masked (micro-batches hold different counts)."""
    tok = tokenizer(
        [CAPTIONS[i * 48 // n] for i in range(n)],
        padding="max_length",
        truncation=True,
        max_length=24,
        return_tensors="pt",
    )
    ids, labels = tok["input_ids"].clone(), torch.full((n, 24), -100)
    for i in range(n):
        for pos in range(2, 3 + i % 3):
            labels[i, pos], ids[i, pos] = ids[i, pos], tokenizer.mask_token_id
    return {"image": images, "input_ids": ids, "attention_mask": tok["attention_mask"], "mlm_labels": labels}


def _concat(features: list[dict]) -> dict:
    joined = {k: torch.cat([f[k] for f in features]) for k in features[0] if k != "logit_scale"}
    return {**joined, "logit_scale": features[0]["logit_scale"]}


def reference(
    world: int,
    rank: int,
    deterministic: bool,
    device: str = "cpu",
    kernels: str = "reference",
    overrides: tuple[str, ...] = (),
):
    """Plain PyTorch on this rank's share of the batch: (terms, total, {name: grad averaged over ranks})."""
    cfg, model, batch = make_everything(world, deterministic, device, kernels, overrides)
    local = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}
    model.train()
    model.simclr_head.eval()
    torch.manual_seed(SEED + rank)
    if deterministic:
        features = model(local, SIMCLR)
    else:
        features = _concat([model(micro, SIMCLR) for micro in split_batch(local, MICRO)])
    terms = compute_terms(features, cfg.loss, model.ops)
    total = total_loss(terms, cfg.loss)
    total.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            if world > 1:
                torch.distributed.all_reduce(p.grad)
            grads[name] = p.grad / world
    return {k: v.item() for k, v in terms.items()}, total.item(), grads


def accumulated(
    world: int,
    rank: int,
    deterministic: bool,
    ds_json: str,
    phase: str = SIMCLR,
    device: str = "cpu",
    kernels: str = "reference",
    overrides: tuple[str, ...] = (),
    compiled: bool = False,
):
    """The same through DeepSpeed and the accumulator: (terms, total, grads, engine, model); ``compiled``:
    the image trunk and the text tower under ``torch.compile`` (``aot_eager``), as ``train.compile`` does."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from unimlip_fast.train.accumulate import build_accumulator
    from unimlip_fast.train.ds_config import load_ds_config
    from unimlip_fast.train.schedule import build_optimizer

    cfg, model, batch = make_everything(world, deterministic, device, kernels, overrides)
    if compiled:
        apply_fast(model, dataclasses.replace(REFERENCE_STEP, compile=True), compile_backend="aot_eager")
    local = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}
    ds = fp32_variant(resolve_ds_config(load_ds_config(str(REPO / "configs" / ds_json)), cfg, world))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg.train, torch.device(device)),
        config=ds,
        dist_init_required=False,
    )
    engine.train()
    engine.module.simclr_head.eval()
    accumulator = build_accumulator(engine, cfg, model.ops, world, torch.device(device))
    assert accumulator is not None and engine.gradient_accumulation_steps() == PER_RANK // MICRO
    torch.manual_seed(SEED + rank)  # the CPU and the CUDA generators
    terms, total = accumulator.forward(local, phase)
    accumulator.backward()
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters() if p.requires_grad}
    engine.step()
    return {k: v.item() for k, v in terms.items()}, total.item(), grads, engine, model


def compare(got, want, rel: float = 1e-5) -> list[str]:
    """Mismatches (terms and total to ``rel``; each gradient's error norm within ``rel`` of its norm)."""
    (terms, total, grads), (ref_terms, ref_total, ref_grads) = got, want
    problems = []
    if set(terms) != set(ref_terms) or len(terms) != 5:
        problems.append(f"terms {sorted(terms)} vs {sorted(ref_terms)}")
    for name, value in {**ref_terms, "total": ref_total}.items():
        mine = terms.get(name) if name != "total" else total
        if mine is None or abs(mine - value) > rel * abs(value):
            problems.append(f"{name}: {mine} vs {value}")
    # A gradient that is 0 in exact arithmetic (an attention key bias's) is rounding noise: its
    # error is measured against a thousandth of the whole gradient's norm instead.
    floor = 1e-3 * torch.stack([g.norm() for g in ref_grads.values()]).norm().item()
    for name, ref in ref_grads.items():
        error = (grads[name].to(ref.device) - ref).norm().item()
        if not error <= rel * max(ref.norm().item(), floor):
            problems.append(f"grad {name}: error {error:.3g}, norm {ref.norm().item():.3g}")
    if ref_grads["visual.conv1.weight"].abs().sum() == 0 or ref_grads["logit_scale"].abs().sum() == 0:
        problems.append("vacuous: no gradient reached the image encoder or the logit scale")
    return problems


def _worker(rank: int, world: int, out_dir: str) -> None:
    from unimlip_fast.train.distributed import init_distributed

    init_distributed()
    report = {}
    for name, deterministic, ds_json in [
        ("whole batch, ZeRO-2", True, "zero2_fp32.json"),
        ("same draws, ZeRO-2", False, "zero2_fp32.json"),
        ("same draws, ZeRO-3", False, "zero3.json"),
    ]:
        got = accumulated(world, rank, deterministic, ds_json)
        report[name] = compare(got[:3], reference(world, rank, deterministic))
        engine = got[3]
        report[name + ": one optimizer step"] = (
            []
            if (engine.global_steps, engine.micro_steps) == (1, 4)
            else [f"steps {engine.global_steps}, micro {engine.micro_steps}"]
        )
        if deterministic:  # randomness on really changes the features (else the second case proves nothing)
            rand = accumulated(world, rank, False, ds_json)[0]
            report["randomness is on"] = [] if abs(rand["itc_txt_fp"] - got[0]["itc_txt_fp"]) > 1e-4 else ["same"]
    report["BatchNorm statistics move once per micro-batch"] = _running_statistics(world, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    torch.distributed.destroy_process_group()


def _running_statistics(world: int, rank: int) -> list[str]:
    """Warm-up phase (statistics updated): after the accumulated step they are what one forward of
    each micro-batch in turn leaves, not two."""
    model = accumulated(world, rank, False, "zero2_fp32.json", phase=WARMUP)[4]
    _, ref, batch = make_everything(world, False)
    ref.train()
    local = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}
    with torch.no_grad():
        for micro in split_batch(local, MICRO):
            ref(micro, WARMUP)
    problems = []
    for name in ("visual.bn1.running_mean", "visual.layer4.0.bn3.running_var", "simclr_head.net.1.running_mean"):
        mine, want = model.get_buffer(name), ref.get_buffer(name)
        if not torch.allclose(mine, want, rtol=1e-5, atol=1e-7):
            problems.append(name)
    return problems


def _fused_worker(rank: int, world: int, out_dir: str, device: str) -> None:
    """The fused kernels (DropBlock's Philox seed comes from the CPU generator): on CUDA, or on CPU
    tensors in Triton's interpreter."""
    init_distributed()
    got = accumulated(1, 0, False, "zero2_fp32.json", device=device, kernels="triton")
    # On CUDA, TF32 convolutions and Triton dots: rounding well above fp32's, far below what a
    # wrong dropout or DropBlock mask does to the gradients (several percent).
    rel = 2e-3 if device == "cuda" else 1e-5
    report = {f"same draws, Triton kernels, {device}": compare(got[:3], reference(1, 0, False, device, "triton"), rel)}
    with open(os.path.join(out_dir, "fused.json"), "w") as fh:
        json.dump(report, fh)
    torch.distributed.destroy_process_group()


def _compiled_worker(rank: int, world: int, out_dir: str) -> None:
    """The accumulated step with the towers compiled, against the uncompiled reference. BERT's dropout
    inside the compiled tower is off (under inductor it draws from another generator); DropBlock and
    the text-embedding dropout run outside the compiled parts, so the replayed draws are still tested."""
    init_distributed()
    no_bert_dropout = ("model.text.hidden_dropout=0.0",)
    torch._dynamo.reset()
    got = accumulated(1, 0, False, "zero2_fp32.json", overrides=no_bert_dropout, compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    report = {
        "same draws, towers compiled": compare(got[:3], reference(1, 0, False, overrides=no_bert_dropout)),
        "dynamo captured the towers": [] if graphs >= 2 else [f"{graphs} graphs"],
    }
    with open(os.path.join(out_dir, "compiled.json"), "w") as fh:
        json.dump(report, fh)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_accumulated_step_matches_the_whole_batch(tmp_path, world):
    spawn_ranks(_worker, world, str(tmp_path))
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(report) == 8
        assert {case: problems for case, problems in report.items() if problems} == {}, f"rank {rank}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU cases cover the algorithm)")
def test_accumulated_step_on_cuda_replays_the_random_draws(tmp_path):
    """The CUDA generator's state restored for each micro-batch's second forward, the fused kernels."""
    spawn_ranks(_fused_worker, 1, str(tmp_path), "cuda", accelerator="cuda")
    report = json.loads((tmp_path / "fused.json").read_text())
    assert {case: problems for case, problems in report.items() if problems} == {}


@pytest.mark.slow
@pytest.mark.interpreter
def test_accumulated_step_with_the_fused_kernels_interpreted(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    spawn_ranks(_fused_worker, 1, str(tmp_path), "cpu")
    report = json.loads((tmp_path / "fused.json").read_text())
    assert {case: problems for case, problems in report.items() if problems} == {}


@pytest.mark.slow
def test_accumulated_step_with_compiled_towers(tmp_path):
    spawn_ranks(_compiled_worker, 1, str(tmp_path))
    report = json.loads((tmp_path / "compiled.json").read_text())
    assert {case: problems for case, problems in report.items() if problems} == {}


def test_micro_batch_plan_and_deepspeed_config():
    cfg = load_config(None, ["train.batch_size=768", "train.micro_batch_size=96"])
    assert micro_batch_plan(768, 1, 96) == (96, 8) and micro_batch_plan(768, 8, 0) == (96, 1)
    ds = resolve_ds_config({"train_batch_size": "auto", "gradient_accumulation_steps": "auto"}, cfg, 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (96, 4)
    with pytest.raises(ConfigError, match="must divide the per-rank batch of 384"):
        resolve_ds_config({}, load_config(None, ["train.batch_size=768", "train.micro_batch_size=100"]), 2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 but the recipe says 4"):
        resolve_ds_config({"gradient_accumulation_steps": 2}, cfg, 2)
    with pytest.raises(ConfigError, match="at least 2"):
        load_config(None, ["train.micro_batch_size=1"])


def test_stopped_and_resumed_accumulated_run_matches_uninterrupted(tmp_path, monkeypatch):
    """Through the CLI: batch 16 as 4 micro-batches of 4, SimCLR phase from step 2, stopped with a
    checkpoint after step 2; the resumed steps 3 and 4 give the uninterrupted run's losses."""
    import sys

    from unimlip_fast.cli import main

    def run(run_dir, *extra) -> None:
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "unimlip-fast",
                "pretrain",
                str(REPO / "configs/demo.yaml"),
                "--ds-config",
                str(REPO / "configs/zero2_fp32.json"),
                "--run-dir",
                str(run_dir),
                *extra,
            ],
        )
        with pytest.raises(SystemExit) as e:
            main()
            raise SystemExit(0)
        assert e.value.code == 0

    common = TINY_OVERRIDES + [
        "data.format=phantom",
        "data.phantom_size=96",
        "data.num_workers=0",
        "train.batch_size=16",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.warmup_steps=2",
        "train.simclr_start=2",
        "train.lr=1e-3",
        "train.max_steps=4",
        "eval.split=",
    ]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(whole, *common)
    run(parts, *common, "train.stop_after_steps=2")
    run(parts, *common, "--resume", "latest")
    read = lambda d: {
        m["step"]: m for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss/total" in m
    }
    a, b = read(whole), read(parts)
    assert sorted(b) == [1, 2, 3, 4] and b[4]["phase"] == "simclr"
    assert all(m["accum/micro_batch"] == 4 and m["accum/extra_forward_samples_per_s"] > 0 for m in a.values())
    for step in (3, 4):
        for key in ("loss/total", "loss/itc", "loss/itc_img_fp", "loss/itc_txt_fp", "loss/simclr", "loss/mlm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
