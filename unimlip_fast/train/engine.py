"""Pretraining: DeepSpeed engine, phases, the loop, checkpoints. Read it top to bottom.

``pretrain`` claims the run folder and runs one :class:`Pretraining`, built once by its ``setup``;
its ``run`` trains epoch by epoch (``run_epoch``), step by step (``take_step``), ``end_epoch`` the
one place an epoch rolls over.

The phase (``warmup`` without SimCLR, then ``simclr`` with the image encoder's BatchNorm statistics
frozen) is computed here from the step and passed down: the loader makes strong views only when
asked, the model freezes BatchNorm statistics when told.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, save_config, to_dict
from ..data.backends import build_train_loader, resolve_backend
from ..data.dataset import build_dataset
from ..data.decoding import set_max_image_pixels
from ..data.masking import MaskingTables
from ..data.records import describe_skips
from ..data.shards import load_shards
from ..data.sources import read_records
from ..data.spec import batches_per_epoch, loader_spec, trim_padding
from ..kernels.ops import kernels_note, resolve_ops
from ..loading import load_init_from, tokenizer_of
from ..model import SIMCLR, WARMUP, build_model, build_tokenizer
from ..objective import compute_terms, total_loss
from ..provenance import code_commit
from ..run_folder import RunFolder
from .accumulate import build_accumulator
from .checkpoint import export_weights, load_checkpoint, require_room_for_checkpoint, save_checkpoint
from .claim import claim_run_folder
from .distributed import DistEnv, barrier, init_distributed
from .ds_config import fp32_variant, load_ds_config, precision_of, resolve_ds_config
from .facts import environment_facts
from .fast import apply_fast, resolve_fast
from .monitor import Monitor
from .nonfinite import NonFiniteCount, NonFiniteGuard, deepspeed_skips_nonfinite, guard_note, loss_finite_everywhere
from .replicas import average_batchnorm_stats, clamp_parameter_
from .schedule import build_optimizer, phase_start_step, warmup_cosine
from .stopping import TrainingStopped, stop_on_signals, stop_requested, stop_signal


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # batches consumed in this epoch (resume point)
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # samples that failed to load, by reason, each once
    skipped_epoch: dict[str, int] = field(default_factory=dict)  # the same, in this epoch

    @property
    def nonfinite(self) -> NonFiniteCount:
        return NonFiniteCount(self.nonfinite_total, self.nonfinite_in_row)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(
    cfg: Config,
    ds_config_path: str | None = None,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``resume``: ``latest`` or a checkpoint tag; ``overwrite``: start over in a folder holding a run.
    A run that fails before its first step leaves no run folder behind when it made the folder itself
    (:func:`.claim.claim_run_folder`). SIGINT or SIGTERM ends it after the step in progress, with a
    checkpoint (:mod:`.stopping`)."""
    env = init_distributed()
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    with (
        stop_on_signals(f"the run in {run_dir}", env),
        claim_run_folder(run_dir, env, resume, overwrite) as (resume_tag, resume_notes),
    ):
        return _pretrain_locked(cfg, ds_config_path, run_dir, resume_tag, resume_notes, env)


def _pretrain_locked(
    cfg: Config,
    ds_config_path: str | None,
    run_dir: Path,
    resume_tag: str | None,
    resume_notes: list[str],
    env: DistEnv,
) -> dict[str, Any]:
    recipe = Pretraining(cfg, env, RunFolder(run_dir))
    recipe.setup(ds_config_path, resume_tag, resume_notes)
    return recipe.run()


class Pretraining:
    """One pretraining run, built once: :meth:`setup` (data, tokenizer, model, DeepSpeed engine,
    resume, monitor), then :meth:`run`: epochs (:meth:`run_epoch`, one loader per epoch and phase)
    of steps (:meth:`take_step`), each epoch closed by :meth:`end_epoch`; then the checkpoint, the
    weights, the final evaluation and the summary."""

    def __init__(self, cfg: Config, env: DistEnv, run: RunFolder):
        self.cfg, self.env, self.run_folder = cfg, env, run

    # ------------------------------------------------------------------------------------ setup

    def setup(self, ds_config_path: str | None, resume_tag: str | None, resume_notes: list[str]) -> None:
        cfg, env, run = self.cfg, self.env, self.run_folder
        resolve_backend(cfg.data.backend, env.device, cfg.data.shards or None)  # a backend refused: before any work
        config_notes = []
        if env.is_main:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            config_notes = [note for note in [save_config(cfg, run.config)] if note]
        barrier()
        seed_everything(cfg.train.seed + env.rank)

        set_max_image_pixels(cfg.data.max_image_pixels)  # before the loader's workers start: they inherit it
        self.records = read_records(cfg.data, cfg.data.split)
        eval_note = _check_eval_split(cfg, self.records.items)
        self.tokenizer = _tokenizer(cfg, [r.caption for r in self.records.items], run.path, env, resume_tag is not None)
        self.model = model = build_model(cfg.model, cfg.loss, self.tokenizer)
        model.ops = resolve_ops(cfg.model.kernels, env.device)
        notes = resume_notes + config_notes + eval_note + [kernels_note(cfg.model.kernels, model.ops, env.device)]
        self.fast = resolve_fast(cfg.train, env.device)
        apply_fast(model, self.fast)
        notes.append(self.fast.note(cfg.train.fast, env.device))
        if env.device.type == "cpu" and cfg.train.cpu_precision == "fp32":
            notes.append(
                "CPU run: reduced precision from the DeepSpeed config is replaced by fp32, several "
                "times faster here (train.cpu_precision=as-configured keeps it)"
            )
        if cfg.model.init_from and resume_tag is None:
            report = load_init_from(model, cfg.model.init_from)
            notes.append(
                f"init from {cfg.model.init_from}: {report.summary()}; "
                f"missing: {report.missing}; unexpected: {report.unexpected}; "
                f"mismatched: {report.mismatched}"
            )
        if env.is_main:
            run.save_text_artifacts(model, self.tokenizer)

        self.dataset = build_dataset(
            self.records.items,
            self.tokenizer,
            cfg.model.image_size,
            cfg.model.text.context_length,
            cache_images=cfg.data.cache_images,
        )
        self.steps_per_epoch = batches_per_epoch(
            len(self.dataset), cfg.train.batch_size // env.world_size, env.world_size
        )
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.simclr_step = phase_start_step(cfg.train.simclr_start, self.steps_per_epoch, self.total_steps)
        self.mlm_tables = MaskingTables.from_tokenizer(self.tokenizer) if cfg.loss.mlm > 0 else None
        # The second phase: SimCLR on, or strong views fed without it (data.strong_views=on).
        self.second_phase = cfg.loss.simclr > 0 or cfg.data.strong_views == "on"

        require_room_for_checkpoint(model, run.checkpoints)
        self.engine, self.ds_config = deepspeed_engine(
            model, cfg, ds_config_path, env, self.total_steps, fused_adamw=self.fast.fused_adamw
        )
        self.state = TrainerState()
        if resume_tag is not None:
            self.state = TrainerState(**load_checkpoint(self.engine, run.checkpoints, resume_tag, env))
        self.stop_at = self.total_steps
        if cfg.train.stop_after_steps:
            self.stop_at = min(self.total_steps, self.state.step + cfg.train.stop_after_steps)
        self.monitor = Monitor(
            run.path,
            self.total_steps,
            enabled=env.is_main,
            resume_step=self.state.step if resume_tag else None,
            report_to=cfg.train.report_to,
            config=to_dict(cfg),
        )
        # Whether DeepSpeed's step checks the gradients itself, and fp16 loss scaling, as the engine runs.
        self.guard = NonFiniteGuard(
            cfg.train.max_nonfinite,
            env.device,
            self.monitor.info,
            loss_scaled=precision_of(self.engine.config) == "fp16",
        )
        self.checked_in_step = deepspeed_skips_nonfinite(self.engine.config)
        self._describe(notes, resume_tag)

    def _describe(self, notes: list[str], resume_tag: str | None) -> None:
        cfg, env, ds_config, state = self.cfg, self.env, self.ds_config, self.state
        for note in notes + [guard_note(ds_config)]:
            self.monitor.info(note)
        self.monitor.info(
            f"{len(self.dataset)} pairs (skipped while reading: {describe_skips(self.records.skipped) or 'none'}); "
            f"{env.world_size} rank(s) x {cfg.train.batch_size // env.world_size} = batch {cfg.train.batch_size}; "
            f"{self.steps_per_epoch} steps/epoch; {self.total_steps} steps; SimCLR phase from step "
            f"{self.simclr_step}; precision {precision_of(ds_config)}, ZeRO stage "
            f"{ds_config.get('zero_optimization', {}).get('stage', 0)}"
            + (f"; resumed from {resume_tag} at step {state.step}" if resume_tag else "")
        )
        if env.is_main:
            self.monitor.facts(
                {
                    **environment_facts(env, ds_config),
                    "pairs": len(self.dataset),
                    "skipped_records": dict(self.records.skipped),
                    "batch_size": cfg.train.batch_size,
                    "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps,
                    "simclr_step": self.simclr_step,
                    "resumed_from": resume_tag,
                    "resumed_at_step": state.step,
                }
            )

    # -------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Train to the end (or ``train.stop_after_steps``), save, export, evaluate; the summary."""
        cfg, env, run, engine, state = self.cfg, self.env, self.run_folder, self.engine, self.state
        started = time.time()
        try:
            self.spec = loader_spec(
                cfg, env.rank, env.world_size, env.device, next(engine.module.parameters()).dtype, self.mlm_tables
            )
            self.stopping = False
            self.train()
            save_checkpoint(engine, run.checkpoints, state.step, asdict(state), env, cfg.train.keep_last)
            if self.stopping and state.step < self.stop_at:
                message = (
                    f"stopped on {stop_signal() or 'a signal to another rank'} after step {state.step}: "
                    f"checkpoint saved in {run.checkpoints}; continue with --resume latest"
                )
                self.monitor.info(message)
                if not env.is_main and stop_signal():  # the rank a scheduler signalled says so in its own log
                    self.monitor.console.print(f"rank {env.rank}: {message}", highlight=False)
                raise TrainingStopped(message, announced=True)
            if state.step >= self.total_steps:
                export_weights(engine, run.weights, env)
        finally:
            self.monitor.close()
            # The optimizer's gradient hooks keep the engine, its model and its optimizer state alive after
            # the run (until the process ends): a process that trains again (ablate's rows) would hold each.
            engine.destroy()
        summary = {
            "steps": state.step,
            "epochs": state.epoch,
            "wall_s": round(time.time() - started, 1),
            "skipped_records": dict(self.records.skipped),
            "skipped_samples": state.skipped,
            "nonfinite_steps": state.nonfinite_total,
            "run_dir": str(run.path),
            "commit": code_commit(),
        }
        if cfg.data.shards:  # what verifying the shards skipped, named by shard (in skipped_samples too, summed)
            summary["skipped_by_shard"] = load_shards(cfg.data.shards).skipped_by_shard
        if env.is_main and state.step >= self.total_steps:
            summary.update(_final_eval(engine.module, self.tokenizer, cfg, env, run))
            run.summary.write_text(json.dumps(summary, indent=2))
            _write_report(run.path, env, self.monitor)
        barrier()
        return summary

    def phase_at(self, step: int) -> str:
        return SIMCLR if step >= self.simclr_step and self.second_phase else WARMUP

    def train(self) -> None:
        """Epochs (or the parts of them one phase covers) until the stop step."""
        self.interval = _Interval()
        self.accumulator = build_accumulator(
            self.engine, self.cfg, self.model.ops, self.env.world_size, self.env.device
        )
        if self.accumulator is not None:
            self.monitor.info(self.accumulator.describe())
        self.engine.train()
        self.described = None
        self.dali_failure: str | None = None
        self.to_compile = {WARMUP, SIMCLR} if self.fast.compile else set()
        while self.state.step < self.stop_at and not self.stopping:
            self.run_epoch()

    def run_epoch(self) -> None:
        """One loader's batches: the rest of the epoch in the current phase. A phase switch (or the
        stop step) ends it early; a loader that runs out ends the epoch."""
        cfg, state = self.cfg, self.state
        phase = self.phase_at(state.step)
        if phase == SIMCLR and cfg.loss.freeze_bn_stats:
            # The statistics freeze here (the phase switch, or a resume inside the frozen phase):
            # every rank must freeze the same numbers.
            average_batchnorm_stats(self.model.visual)
        strong_views = phase == SIMCLR and cfg.data.strong_views != "off"
        loader = build_train_loader(
            cfg.data.backend,
            self.dataset,
            self.spec.for_epoch(state.epoch, strong_views, state.batch_in_epoch),
            shards=cfg.data.shards or None,
            dali_failed=self.dali_failure,
        )
        self.dali_failure = loader.dali_failure  # auto's DALI failed once: the torch path from then on
        if loader.description != self.described:
            self.monitor.info(f"data: {loader.description}")
            self.described = loader.description
        with torch.random.fork_rng(devices=[]):  # the loader's worker seeds must not move the model's RNG
            batches = iter(loader)
        self.interval.mark_data()
        consumed = 0
        for batch in batches:
            consumed += 1
            if not self.take_step(batch, phase):
                return  # a new phase needs a loader that makes (or stops making) strong views
        if consumed == 0:
            raise RuntimeError(f"the data loader yielded no batch in epoch {state.epoch}")
        if state.batch_in_epoch:  # the loader ran out: the epoch is over, whatever its length
            self.end_epoch()

    def end_epoch(self) -> None:
        state = self.state
        state.epoch, state.batch_in_epoch, state.skipped_epoch = state.epoch + 1, 0, {}

    def take_step(self, batch: dict, phase: str) -> bool:
        """Forward, backward and optimizer step on one batch (or a step every rank skips); then log,
        evaluate and checkpoint as configured. -> whether this loader's batches go on."""
        cfg, env, engine, state, interval = self.cfg, self.env, self.engine, self.state, self.interval
        _count_skipped(state, batch.pop("skipped", {}))
        batch = {k: v.to(env.device, non_blocking=True) for k, v in trim_padding(batch).items()}
        interval.data_done()

        if self.accumulator is None:
            features = engine(batch, phase)
            terms = compute_terms(features, cfg.loss, self.model.ops)
            loss = total_loss(terms, cfg.loss)
        else:  # micro-batches without autograd; the terms over the whole batch's features
            terms, loss = self.accumulator.forward(batch, phase)
        state.batch_in_epoch += 1
        if state.batch_in_epoch == self.steps_per_epoch:
            self.end_epoch()
        if not (self.checked_in_step or loss_finite_everywhere(loss, env.device)):  # configs DeepSpeed does not check
            self._skip_step(terms, loss)
            return True
        if self.accumulator is None:
            engine.backward(loss)
        else:  # each micro-batch again, backpropagating its cached feature gradients
            self.accumulator.backward()
        # The one host sync per step is DeepSpeed's, inside step(): it reads the all-reduced gradient
        # norm and, when it is not finite, skips the update on every rank (train/nonfinite.py).
        engine.step()
        if not engine.was_step_applied():
            self._skip_step(terms, loss)
            return True
        state.nonfinite_in_row = 0
        clamp_parameter_(self.model.logit_scale, 0.0, math.log(cfg.model.logit_scale_max))  # as open_clip, PMC-CLIP
        state.step += 1
        interval.add(terms, loss, cfg.train.batch_size)
        if phase in self.to_compile:  # this step compiled the graphs: its time is reported apart
            self.to_compile.discard(phase)
            took = interval.exclude_step(cfg.train.batch_size)
            self.monitor.info(f"compile: the first {phase} step took {took:.1f} s (kept out of samples/s)")
        self._after_step(phase)
        self.stopping = stop_requested(self.env, state.step, cfg.train.log_every)  # SIGINT, SIGTERM: stopping.py
        if state.step >= self.stop_at or self.phase_at(state.step) != phase or self.stopping:
            return False
        interval.mark_data()
        return True

    def _skip_step(self, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        state = self.state
        count = self.guard.record_skipped_step(state.nonfinite, state.step, terms, loss)
        state.nonfinite_total, state.nonfinite_in_row = count.total, count.in_row

    def _after_step(self, phase: str) -> None:
        """The log line (every ``train.log_every`` steps), periodic evaluation and checkpoints."""
        cfg, env, engine, step, total = self.cfg, self.env, self.engine, self.state.step, self.total_steps
        if step % cfg.train.log_every == 0 or step == total:
            record = self.interval.flush(engine, self.model, phase, self.state)
            self.monitor.log(step, {**record, **(self.accumulator.flush() if self.accumulator else {})})
        else:
            self.monitor.advance(step)
        if cfg.eval.split and cfg.eval.every and step % cfg.eval.every == 0 and step < total:
            _periodic_eval(engine.module, self.tokenizer, cfg, env, self.monitor, step)
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < total:
            save_checkpoint(engine, self.run_folder.checkpoints, step, asdict(self.state), env, cfg.train.keep_last)


def _count_skipped(state: TrainerState, skipped: dict[str, int]) -> None:
    """Samples that failed to load, each bad file counted once: every epoch meets the same bad files
    again, so the count per reason is the most that one epoch met."""
    for reason, count in skipped.items():
        state.skipped_epoch[reason] = state.skipped_epoch.get(reason, 0) + count
        state.skipped[reason] = max(state.skipped.get(reason, 0), state.skipped_epoch[reason])


def _periodic_eval(model, tokenizer, cfg: Config, env: DistEnv, monitor: Monitor, step: int) -> None:
    if env.is_main:
        from ..eval.retrieval import evaluate_retrieval

        results = evaluate_retrieval(model, tokenizer, cfg.data, cfg.eval.split, env.device, cfg.eval.batch_size)
        monitor.log(step, {f"retrieval/{d}_{k}": results[d][k] for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")})
    barrier()
    model.train()


class _Interval:
    """Loss terms and timings accumulated between two log lines (device tensors: no syncs)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.samples, self.data_time, self.excluded = 0, 0, 0.0, 0.0
        self.start = time.perf_counter()
        self._data_start = self._step_start = self.start

    def mark_data(self) -> None:
        self._data_start = time.perf_counter()

    def data_done(self) -> None:
        self._step_start = time.perf_counter()
        self.data_time += self._step_start - self._data_start

    def exclude_step(self, samples: int) -> float:
        """Keep the step just taken (a compiling one) out of samples/s; -> its seconds."""
        seconds = time.perf_counter() - self._step_start
        self.excluded += seconds
        self.samples -= samples
        return seconds

    def add(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, samples: int) -> None:
        for name, value in {**terms, "total": loss}.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1
        self.samples += samples

    def flush(self, engine, model, phase: str, state: TrainerState) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start - self.excluded
        record: dict[str, Any] = {f"loss/{k}": float(v) / max(1, self.steps) for k, v in self.sums.items()}
        record.update(
            {
                "lr": engine.get_lr()[0],
                "logit_scale": float(model.scale().detach()),
                "phase": phase,
                "epoch": state.epoch,
                "samples_per_s": self.samples / elapsed,
                "step_time_s": elapsed / max(1, self.steps),
                "data_time_s": self.data_time / max(1, self.steps),
                "memory_gb": _memory_gb(),
                "skipped_samples": sum(state.skipped.values()),
                "nonfinite_steps": state.nonfinite_total,
            }
        )
        self.__init__()
        return record


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _check_eval_split(cfg: Config, train_records) -> list[str]:
    """Read the evaluation split now (a bad one fails before training, not after) and refuse one
    whose pairs are all training pairs: evaluation never reads training data labelled as held out."""
    if not cfg.eval.split:
        return []
    held_out = read_records(cfg.data, cfg.eval.split).items
    pairs = lambda records: {(r.image, r.caption) for r in records if isinstance(r.image, str)}
    shared = pairs(held_out) & pairs(train_records)
    if held_out and len(shared) == len(held_out):
        raise ConfigError(
            f"eval.split={cfg.eval.split} holds the same {len(held_out)} pairs as the training split "
            f"data.split={cfg.data.split}: choose a held-out split (or eval.split= for none)"
        )
    return [
        f"eval.split={cfg.eval.split}: {len(held_out)} pairs"
        + (f", {len(shared)} of them also in the training split" if shared else "")
    ]


def _tokenizer(cfg: Config, captions: list[str], run_dir: Path, env: DistEnv, resuming: bool):
    """Rank 0 builds (or, resuming, the run folder holds) the tokenizer; every rank loads the same one.
    A run continued from another run of this project (``model.init_from``) takes that run's tokenizer,
    so its token ids mean what the weights learnt (a WordPiece vocabulary is trained per run)."""
    from transformers import AutoTokenizer

    saved = RunFolder(run_dir).tokenizer
    if not resuming and env.is_main:
        parent = tokenizer_of(cfg.model.init_from) if cfg.model.init_from else None
        if parent is not None and parent.is_dir():
            AutoTokenizer.from_pretrained(str(parent)).save_pretrained(str(saved))
        else:
            build_tokenizer(cfg.model.text, captions).save_pretrained(str(saved))
    barrier()
    return AutoTokenizer.from_pretrained(str(saved))


def deepspeed_engine(
    model, cfg: Config, ds_config_path: str | None, env: DistEnv, total_steps: int, fused_adamw: bool = False
):
    """The DeepSpeed engine of the trainer (and of bench/bench_step.py): ZeRO config, AdamW (torch's
    fused one with ``fused_adamw``), warm-up + cosine."""
    import deepspeed

    ds_config = resolve_ds_config(load_ds_config(ds_config_path), cfg, env.world_size)
    if env.device.type == "cpu" and cfg.train.cpu_precision == "fp32" and precision_of(ds_config) != "fp32":
        ds_config = fp32_variant(ds_config)
    optimizer = build_optimizer(model, cfg.train, env.device, fused=fused_adamw)
    schedule = lambda step: warmup_cosine(step, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine, ds_config


def _write_report(run_dir: Path, env: DistEnv, monitor: Monitor) -> None:
    """The HTML run report; a failure here is logged and never fails the finished run."""
    try:
        from ..report import write_report

        files = write_report([run_dir], device=env.device)
        monitor.info(f"report: {files.html}" + "".join(f"; {problem}" for problem in files.problems))
    except Exception as e:  # noqa: BLE001 - the run is done; its report is a convenience
        monitor.info(f"[yellow]report not written[/yellow]: {type(e).__name__}: {e}")


def _final_eval(model, tokenizer, cfg: Config, env: DistEnv, run: RunFolder) -> dict[str, Any]:
    if not cfg.eval.split:
        return {}
    from ..eval.retrieval import RetrievalProtocol, evaluate_retrieval

    results = evaluate_retrieval(
        model, tokenizer, cfg.data, cfg.eval.split, env.device, cfg.eval.batch_size, RetrievalProtocol(per_query=True)
    )
    run.retrieval(cfg.eval.split).write_text(json.dumps(results, indent=2))
    return {"retrieval": {k: v for k, v in results.items() if k != "per_query"}}  # per query: in the file only
