"""A non-finite step on one of two ranks (gloo, DeepSpeed ZeRO-2) is skipped on both: no weight, no
optimizer moment and no lr schedule position moves on either rank; it is counted; too many in a row
stop the run on every rank. The check is DeepSpeed's own gradient-norm check (no added host sync)."""

import json

import pytest
import torch

from .helpers import CAPTIONS, REPO, TINY_OVERRIDES, spawn_ranks

pytestmark = pytest.mark.slow

TINY_RUN = TINY_OVERRIDES + [
    "data.format=phantom",
    "data.phantom_size=64",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.simclr_start=2",
    "eval.split=",
]


def _setup():
    from unimlip_fast.train.distributed import init_distributed

    return init_distributed()


def _snapshot(engine):
    inner = engine.optimizer.optimizer  # the torch AdamW over DeepSpeed's flat partitions
    moments = [t.clone() for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "moments": moments,
        "lr": engine.get_lr()[0],
        "schedule": engine.lr_scheduler.last_epoch,
    }


def _same(a, b) -> bool:
    return (
        all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        and len(a["moments"]) == len(b["moments"]) > 0
        and all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"]))
        and a["lr"] == b["lr"]
        and a["schedule"] == b["schedule"]
    )


def _engine_rank(rank, world, out_dir):
    env = _setup()
    import deepspeed

    from unimlip_fast.config import load_config
    from unimlip_fast.model import WARMUP, build_model, build_tokenizer
    from unimlip_fast.objective import compute_terms, total_loss
    from unimlip_fast.train.ds_config import load_ds_config, precision_of, resolve_ds_config
    from unimlip_fast.train.nonfinite import (
        NonFiniteCount,
        NonFiniteGuard,
        NonFiniteLossError,
        deepspeed_skips_nonfinite,
    )
    from unimlip_fast.train.schedule import build_optimizer

    results = {}
    for ds_json in ("zero2_fp32.json", "zero2_bf16.json"):
        cfg = load_config(None, TINY_OVERRIDES + ["train.batch_size=8", "train.warmup_steps=2"])
        tokenizer = build_tokenizer(cfg.model.text, CAPTIONS)
        torch.manual_seed(0)  # the same weights on both ranks
        model = build_model(cfg.model, cfg.loss, tokenizer)
        ds = resolve_ds_config(load_ds_config(str(REPO / "configs" / ds_json)), cfg, world)
        optimizer = build_optimizer(model, cfg.train, env.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 2)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, dist_init_required=False
        )
        engine.train()
        g = torch.Generator().manual_seed(rank)
        tok = tokenizer(CAPTIONS[rank * 4 : rank * 4 + 4], padding="max_length", max_length=24, return_tensors="pt")
        batch = {
            "image": torch.randn(4, 3, 64, 64, generator=g),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
        }
        dtype = next(engine.module.parameters()).dtype
        batch["image"] = batch["image"].to(dtype)

        def step(poison: bool):
            terms = compute_terms(engine(batch, WARMUP), cfg.loss, model.ops)
            if poison:
                terms["itc_txt_fp"] = terms["itc_txt_fp"] * float("nan")
            loss = total_loss(terms, cfg.loss)
            engine.backward(loss)
            engine.step()
            return engine.was_step_applied(), terms, loss

        first_applied, *_ = step(False)
        before = _snapshot(engine)
        skipped_applied, terms, loss = step(poison=rank == 1)
        after_skip = _snapshot(engine)
        guard = NonFiniteGuard(2, env.device, lambda _: None, loss_scaled=precision_of(ds) == "fp16")
        count = guard.record_skipped_step(NonFiniteCount(), 1, terms, loss)
        try:
            count = guard.record_skipped_step(count, 1, terms, loss)
            stopped = False
        except NonFiniteLossError as stop:
            count, stopped = stop.count, True
        third_applied, *_ = step(False)
        after_third = _snapshot(engine)
        results[ds_json] = {
            "checked_in_step": deepspeed_skips_nonfinite(ds),
            "first_applied": first_applied,
            "skipped_applied": skipped_applied,
            "unchanged": _same(before, after_skip),
            "third_applied": third_applied,
            "third_moved": not _same(after_skip, after_third),
            "counted": count.total,
            "stopped": stopped,
            "schedule": [before["schedule"], after_skip["schedule"], after_third["schedule"]],
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _loop_rank(rank, world, out_dir):
    """The trainer's loop: a NaN on rank 1 only, at its 2nd batch; then on every batch."""
    _setup()
    from unimlip_fast.config import load_config
    from unimlip_fast.train import engine
    from unimlip_fast.train.nonfinite import NonFiniteLossError

    real = engine.compute_terms
    poisoned = {"calls": 0, "at": set()}

    def compute_terms(*args, **kwargs):
        terms = real(*args, **kwargs)
        poisoned["calls"] += 1
        if rank == 1 and poisoned["calls"] in poisoned["at"]:
            terms["mlm"] = terms["mlm"] * float("nan")
        return terms

    engine.compute_terms = compute_terms
    results = {}
    poisoned["at"] = {2}
    cfg = load_config(REPO / "configs/demo.yaml", TINY_RUN + ["train.max_steps=3"])
    summary = engine.pretrain(cfg, str(REPO / "configs/zero2_fp32.json"), out_dir / "one")
    results["one"] = {k: summary[k] for k in ("steps", "nonfinite_steps")}
    metrics = [json.loads(line) for line in (out_dir / "one" / "metrics.jsonl").read_text().splitlines()]
    results["one"]["losses_finite"] = all(v == v for m in metrics for k, v in m.items() if k.startswith("loss/"))
    poisoned["calls"], poisoned["at"] = 0, set(range(1, 100))
    cfg = load_config(REPO / "configs/demo.yaml", TINY_RUN + ["train.max_steps=6", "train.max_nonfinite=2"])
    try:
        engine.pretrain(cfg, str(REPO / "configs/zero2_fp32.json"), out_dir / "all")
        results["all"] = "finished"
    except NonFiniteLossError as err:
        results["all"] = str(err)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def test_nonfinite_step_on_one_rank_changes_nothing_on_either(tmp_path):
    spawn_ranks(_engine_rank, 2, tmp_path)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for ds_json, r in results.items():
            where = f"rank {rank}, {ds_json}"
            assert r["checked_in_step"], where
            assert r["first_applied"] and not r["skipped_applied"], where
            assert r["unchanged"], f"{where}: a weight, a moment or the schedule moved on the skipped step"
            assert r["third_applied"] and r["third_moved"], f"{where}: vacuous, the next step did not train"
            assert r["schedule"][0] == r["schedule"][1] < r["schedule"][2], where
            assert r["counted"] == 2 and r["stopped"], where


def test_trainer_skips_counts_and_stops_on_every_rank(tmp_path):
    spawn_ranks(_loop_rank, 2, tmp_path)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["one"] == {"steps": 3, "nonfinite_steps": 1, "losses_finite": True}, rank
        assert "2 non-finite steps in a row" in results["all"], (rank, results["all"])
