"""The plan on screen: one rich table per section; every predicted figure says so."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .estimate import GIB, Plan, describe_duration, gib


def show_plan(result: Plan, console: Console, recipe: str) -> None:
    card = result.card
    micro, accumulation = result.accumulation
    console.print(
        f"plan for {recipe} on {result.gpus} x {card.name} ({card.memory_gib:g} GiB, "
        f"{card.half_tflops:g} dense {'bf16' if card.bf16 else 'fp16'} TFLOP/s): {result.precision}, "
        f"ZeRO stage {result.zero_stage}",
        highlight=False,
    )
    params = Table(title="parameters")
    for col in ("tower", "trainable", "frozen"):
        params.add_column(col, justify="left" if col == "tower" else "right")
    for tower, (trainable, frozen) in result.parameters.items():
        params.add_row(tower, f"{trainable / 1e6:.1f} M", f"{frozen / 1e6:.1f} M")
    console.print(params)

    memory = Table(
        title=f"memory per GPU, GiB (usable {gib(result.budget)} of {card.memory_gib:g}: reserve 1 GiB + 10%)"
    )
    memory.add_column("kind")
    memory.add_column("GiB", justify="right")
    memory.add_column("from")
    sources = {
        "weights": "ZeRO accounting",
        "gradients": "ZeRO accounting",
        "fp32_master": "ZeRO accounting",
        "adamw_moments": "ZeRO accounting",
        "gradient_buckets": "DeepSpeed reduce_bucket_size",
    }
    for kind, value in result.states.as_dict().items():
        if kind != "total":
            memory.add_row(kind.replace("_", " "), gib(value), sources[kind])
    for phase, trace in result.traces.items():
        memory.add_row(
            f"activations + temporaries, {phase}",
            gib(trace.activations),
            f"fake-tensor trace at micro-batch {trace.micro_batch}",
        )
    for phase in result.traces:
        memory.add_row(
            f"[bold]total, {phase}[/bold]",
            f"[bold]{gib(result.memory(phase))}[/bold]",
            "fits" if result.memory(phase) <= result.budget else "[red]does not fit[/red]",
        )
    console.print(memory)

    traffic = result.traffic()
    summary = Table(title="fit and predicted time")
    summary.add_column("")
    summary.add_column("value")
    summary.add_row("largest micro-batch that fits", str(result.largest_micro))
    summary.add_row(
        "accumulation plan",
        f"{micro} x {accumulation} per GPU = {result.per_rank}; x {result.gpus} GPUs = {result.per_rank * result.gpus}",
    )
    summary.add_row("FLOPs per sample (forward + backward)", f"{result.flops_per_sample / 1e9:.1f} GFLOP")
    summary.add_row(f"predicted samples/s per GPU (MFU {result.mfu:.0%})", f"{result.samples_per_s:.0f}")
    summary.add_row("predicted step", f"{result.step_s * 1e3:.0f} ms")
    wall = result.wall_s
    summary.add_row(f"predicted wall time ({result.epochs_or_steps})", describe_duration(wall) if wall else "n/a")
    summary.add_row(
        f"ZeRO traffic per step per GPU ({result.link.name}, {result.link.gbytes_per_s:g} GB/s)",
        f"gradients {traffic['gradient_bytes'] / GIB:.2f} GiB in {traffic['gradient_s'] * 1e3:.0f} ms, "
        f"weights {traffic['weight_bytes'] / GIB:.2f} GiB in {traffic['weights_s'] * 1e3:.0f} ms",
    )
    summary.add_row(
        "predicted: hides behind the backward",
        f"{'yes' if traffic['hidden'] else 'no'} (backward {traffic['backward_s'] * 1e3:.0f} ms; "
        f"exposed {traffic['exposed_s'] * 1e3:.0f} ms per step)",
    )
    console.print(summary)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
