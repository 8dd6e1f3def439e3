"""The plan: fit, largest micro-batch, memory by kind, predicted time and ZeRO traffic for one card.

Memory per GPU = model states (``states.py``, by ZeRO stage and precision) + the traced step's
activations and temporaries at its peak (``trace.py``) against the card's memory less a reserve.
Activations grow linearly with the micro-batch (the B x B contrastive logits are far below a
percent), so two traces fix the line, the line proposes the largest micro-batch, and a trace at
that size confirms it (or the next smaller one is traced). Time and traffic are predictions: FLOPs
per sample at a stated MFU against the card's dense throughput; ZeRO's collectives against the link.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..model.unimlip import SIMCLR, WARMUP
from ..train.accumulate import micro_batch_plan
from ..train.ds_config import precision_of
from .cards import Card, Link, find_link
from .states import ModelStates, model_states, zero_stage
from .trace import StepTrace, TextArchitecture, parameter_counts, text_architecture, trace_step

GIB = 2**30
RESERVE_FIXED_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
RESERVE_FRACTION = 0.10  # the caching allocator's fragmentation
DEFAULT_MFU = 0.35
BACKWARD_SHARE = 2 / 3  # of a step's FLOPs (the backward does twice the forward's)
DATASET_SAMPLES = {"pmc-oa": 1_650_000}  # PMC-OA's pairs (PAPER.md); others need --samples


@dataclass
class Plan:
    card: Card
    gpus: int
    precision: str
    zero_stage: int
    link: Link
    text: TextArchitecture
    parameters: dict[str, tuple[int, int]]
    states: ModelStates
    budget: float
    recipe_micro: int
    per_rank: int
    traces: dict[str, StepTrace]  # by phase, at the recipe's micro-batch (or the largest fitting one)
    largest_micro: int  # the largest micro-batch that fits (any size)
    accumulation: tuple[int, int]  # (micro-batch dividing the per-rank batch, micro-batches per step)
    flops_per_sample: float
    mfu: float
    samples: int | None
    epochs_or_steps: str
    notes: list[str] = field(default_factory=list)
    total_steps: int = 0

    def memory(self, phase: str) -> float:
        return self.states.total + self.traces[phase].activations

    @property
    def fits(self) -> bool:
        return all(self.memory(p) <= self.budget for p in self.traces)

    # --- predicted time ----------------------------------------------------------------------
    @property
    def samples_per_s(self) -> float:
        """Predicted per GPU, compute only."""
        return self.mfu * self.card.half_tflops * 1e12 / self.flops_per_sample

    def traffic(self) -> dict[str, float]:
        """ZeRO's bytes per step per GPU (ring collectives move (N-1)/N of the data per GPU) and their time."""
        n = self.gpus
        grad_bytes = 4 if self.precision in ("fp32", "autocast-bf16", "autocast-fp16") else 2
        trainable = sum(t for t, _ in self.parameters.values())
        total = sum(t + f for t, f in self.parameters.values())
        ring = (n - 1) / n
        micro, accumulation = self.accumulation
        if n == 1:
            gradient, weights = 0.0, 0.0
        elif self.zero_stage == 0:
            gradient, weights = 2 * ring * trainable * grad_bytes, 0.0  # all-reduce once per step
        else:
            # Reduce-scatter of the gradients (ZeRO-2/3: at every micro-batch's backward), all-gather of the weights.
            reductions = accumulation if self.zero_stage >= 2 else 1
            gradient = reductions * ring * trainable * grad_bytes
            weight_bytes = 2 if grad_bytes == 2 else 4
            weights = (2 * accumulation if self.zero_stage == 3 else 1) * ring * total * weight_bytes
        per_s = self.link.gbytes_per_s * 1e9
        compute_s = self.per_rank / self.samples_per_s
        backward_s = BACKWARD_SHARE * compute_s
        gradient_s, weights_s = gradient / per_s, weights / per_s
        # Gradient reduction overlaps the backward (overlap_comm); the weights' all-gather after the step does not
        # (under ZeRO-3 it is prefetched during forward and backward: counted as overlapped with them).
        exposed = max(0.0, gradient_s - backward_s) + (
            weights_s if self.zero_stage in (1, 2) else max(0.0, weights_s + gradient_s - compute_s)
        )
        return {
            "gradient_bytes": gradient,
            "weight_bytes": weights,
            "gradient_s": gradient_s,
            "weights_s": weights_s,
            "backward_s": backward_s,
            "compute_s": compute_s,
            "exposed_s": exposed,
            "hidden": gradient_s <= backward_s,
        }

    @property
    def step_s(self) -> float:
        return self.traffic()["compute_s"] + self.traffic()["exposed_s"]

    @property
    def wall_s(self) -> float | None:
        if self.total_steps:
            return self.total_steps * self.step_s
        return None

    def as_dict(self) -> dict[str, Any]:
        micro, accumulation = self.accumulation
        traffic = self.traffic()
        return {
            "card": self.card.name,
            "gpus": self.gpus,
            "precision": self.precision,
            "zero_stage": self.zero_stage,
            "text_encoder": self.text.source,
            "parameters": {k: {"trainable": t, "frozen": f} for k, (t, f) in self.parameters.items()},
            "model_states_gib": {k: v / GIB for k, v in self.states.as_dict().items()},
            "activations_gib": {p: t.activations / GIB for p, t in self.traces.items()},
            "traced_micro_batch": {p: t.micro_batch for p, t in self.traces.items()},
            "total_gib": {p: self.memory(p) / GIB for p in self.traces},
            "card_memory_gib": self.card.memory_gib,
            "budget_gib": self.budget / GIB,
            "reserve": f"{RESERVE_FIXED_GIB:g} GiB + {RESERVE_FRACTION:.0%} of the card",
            "fits": self.fits,
            "recipe_micro_batch": self.recipe_micro,
            "per_gpu_batch": self.per_rank,
            "largest_micro_batch": self.largest_micro,
            "accumulation": {"micro_batch": micro, "micro_batches_per_step": accumulation},
            "flops_per_sample": self.flops_per_sample,
            "predicted": {
                "mfu": self.mfu,
                "samples_per_s_per_gpu": self.samples_per_s,
                "step_s": self.step_s,
                "total_steps": self.total_steps,
                "wall_s": self.wall_s,
                "over": self.epochs_or_steps,
            },
            "traffic_per_step_per_gpu": {
                "link": self.link.name,
                "link_gbytes_per_s": self.link.gbytes_per_s,
                **traffic,
            },
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Assumptions:
    """What a plan assumes beyond the recipe: the MFU its time is predicted at, the link its
    collectives run over (None: the card's own, or the inter-node one past a node), and the data
    set's size in samples (None: known for PMC-OA, else no wall time)."""

    mfu: float = DEFAULT_MFU
    link: str | None = None
    samples: int | None = None


def plan(
    cfg: Config,
    ds: dict[str, Any],
    card: Card,
    gpus: int,
    assumptions: Assumptions = Assumptions(),
    log=lambda line: None,
) -> Plan:
    mfu, link, samples = assumptions.mfu, assumptions.link, assumptions.samples
    notes: list[str] = []
    precision = precision_of(ds)
    if "bf16" in precision and not card.bf16:
        precision = precision.replace("bf16", "fp16")
        notes.append(f"{card.name} has no bf16: planned in fp16 (the same DeepSpeed config with fp16)")
    recipe_micro, accumulation = micro_batch_plan(cfg.train.batch_size, gpus, cfg.train.micro_batch_size)
    per_rank = recipe_micro * accumulation
    text = text_architecture(cfg)
    parameters = parameter_counts(cfg, text)
    trainable = sum(t for t, _ in parameters.values())
    frozen = sum(f for _, f in parameters.values())
    states = model_states(trainable, frozen, precision, ds, gpus)
    budget = card.memory_gib * GIB * (1 - RESERVE_FRACTION) - RESERVE_FIXED_GIB * GIB
    link_key = link or (card.link if gpus <= card.gpus_per_node else card.inter_node)
    if not link and gpus > card.gpus_per_node:
        notes.append(f"{gpus} GPUs span nodes of {card.gpus_per_node}: the collectives run at the inter-node link")
    main_phase = SIMCLR if cfg.loss.simclr > 0 or cfg.data.strong_views == "on" else WARMUP

    def traced(micro: int, phase: str = main_phase) -> StepTrace:
        log(f"tracing the {phase} step at micro-batch {micro}")
        return trace_step(cfg, text, precision, micro, phase)

    probe_a = traced(1)
    probe_b = traced(recipe_micro if recipe_micro > 1 else 2)
    slope = (probe_b.activations - probe_a.activations) / (probe_b.micro_batch - probe_a.micro_batch)
    intercept = probe_a.activations - slope
    room = budget - states.total
    if states.total + probe_a.activations > budget:
        raise ValueError(
            f"does not fit on {card.name} even at micro-batch 1: model states "
            f"{states.total / GIB:.1f} GiB + activations {probe_a.activations / GIB:.1f} GiB > "
            f"{budget / GIB:.1f} GiB usable"
        )
    largest = max(1, int((room - intercept) // slope)) if slope > 0 else per_rank
    known = {1: probe_a, probe_b.micro_batch: probe_b}
    while largest > 1:  # confirm by a trace; the line is a guide
        trace = known.get(largest) or traced(largest)
        known[largest] = trace
        if states.total + trace.activations <= budget:
            break
        largest -= max(1, largest // 20)
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= largest]
    micro = max(divisors)
    main = known.get(micro) or traced(micro)
    traces = {main_phase: main}
    if main_phase == SIMCLR:
        traces[WARMUP] = traced(micro, WARMUP)
    if micro < recipe_micro:
        notes.append(
            f"the recipe's micro-batch {recipe_micro} does not fit: planned with {micro} x "
            f"{per_rank // micro} accumulated (set train.micro_batch_size={micro})"
        )
    flops_per_sample = main.flops / micro
    samples = samples or DATASET_SAMPLES.get(cfg.data.format)
    if cfg.train.max_steps:
        total_steps, over = cfg.train.max_steps, f"{cfg.train.max_steps} steps"
    elif samples:
        total_steps = cfg.train.epochs * (samples // cfg.train.batch_size)
        over = f"{cfg.train.epochs} epochs of {samples:,} samples"
    else:
        total_steps, over = 0, f"no data set size known for data.format={cfg.data.format} (give --samples)"
    notes.append(f"text encoder: {text.source}")
    return Plan(
        card,
        gpus,
        precision,
        zero_stage(ds),
        find_link(link_key),
        text,
        parameters,
        states,
        budget,
        recipe_micro,
        per_rank,
        traces,
        largest,
        (micro, per_rank // micro),
        flops_per_sample,
        mfu,
        samples,
        over,
        notes,
        total_steps,
    )


def describe_duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"
