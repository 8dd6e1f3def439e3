"""The report's training figures, drawn with matplotlib's Agg renderer (no display, no pyplot state).

Each function takes one or more runs and draws them on the same axes, one colour per run, so an
ablation's rows overlay. The SimCLR phase start is a dashed vertical line in the run's colour.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .runs import RunRecord

TERM_ORDER = ("total", "itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm")
RECALL_KS = (1, 5, 10)
_K_STYLES = {1: ":", 5: "--", 10: "-"}
_DIRECTIONS = {"i2t": "image -> text", "t2i": "text -> image"}


def run_colour(i: int) -> str:
    """The run's colour, as a hex string that CSS reads too."""
    return to_hex(f"C{i % 10}")


def save_png(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def loss_terms(runs: list[RunRecord]) -> list[str]:
    """The loss terms any run logged: the known ones in their order, then any other."""
    logged = {k.removeprefix("loss/") for run in runs for row in run.train_rows for k in row if k.startswith("loss/")}
    return [t for t in TERM_ORDER if t in logged] + sorted(logged - set(TERM_ORDER))


def _series(run: RunRecord, key: str, rows=None) -> tuple[list[int], list[float]]:
    points = [
        (row["step"], row[key])
        for row in (run.train_rows if rows is None else rows)
        if isinstance(row.get(key), (int, float))
    ]
    return [s for s, _ in points], [v for _, v in points]


def _mark_simclr(ax, runs: list[RunRecord], label: bool = False) -> None:
    for i, run in enumerate(runs):
        step = run.simclr_step()
        if step is not None:
            ax.axvline(
                step,
                color=run_colour(i),
                linestyle="--",
                linewidth=1,
                alpha=0.7,
                label="SimCLR phase starts" if label and i == 0 else None,
            )


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=9)


def loss_figure(runs: list[RunRecord]) -> Figure:
    """Every loss term and the total against step; learning rate and logit scale beneath."""
    terms = loss_terms(runs)
    rows = max(1, math.ceil(len(terms) / 3))
    fig = Figure(figsize=(13, 3.1 * (rows + 1)), layout="constrained")
    grid = fig.add_gridspec(rows + 1, 6)
    for n, term in enumerate(terms):
        ax = fig.add_subplot(grid[n // 3, 2 * (n % 3) : 2 * (n % 3) + 2])
        for i, run in enumerate(runs):
            steps, values = _series(run, f"loss/{term}")
            if steps:
                ax.plot(steps, values, color=run_colour(i), linewidth=1.4, label=run.label)
        _mark_simclr(ax, runs, label=n == 0)
        ax.set_title("total (weighted sum)" if term == "total" else term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if n == 0:
            ax.legend(fontsize=8)
    for col, (key, title) in enumerate((("lr", "learning rate"), ("logit_scale", "logit scale"))):
        ax = fig.add_subplot(grid[rows, 3 * col : 3 * col + 3])
        for i, run in enumerate(runs):
            steps, values = _series(run, key)
            ax.plot(steps, values, color=run_colour(i), linewidth=1.4)
        _mark_simclr(ax, runs)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Loss terms (mean over each logging interval)")
    return fig


def throughput_figure(runs: list[RunRecord]) -> Figure:
    """Samples/s; data time against step time; memory."""
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    speed, times, memory = fig.subplots(1, 3)
    for i, run in enumerate(runs):
        colour = run_colour(i)
        speed.plot(*_series(run, "samples_per_s"), color=colour, label=run.label)
        times.plot(*_series(run, "step_time_s"), color=colour, label=f"{run.label}: step" if len(runs) > 1 else "step")
        times.plot(
            *_series(run, "data_time_s"),
            color=colour,
            linestyle="--",
            label=f"{run.label}: waiting for data" if len(runs) > 1 else "waiting for data",
        )
        memory.plot(*_series(run, "memory_gb"), color=colour)
    for ax in (speed, times, memory):
        _mark_simclr(ax, runs)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    speed.set_title("samples / s")
    speed.legend(fontsize=8)
    times.set_title("seconds per step")
    times.legend(fontsize=8)
    memory.set_title("peak memory (GiB)")
    memory.set_ylabel("GPU: allocated; CPU: process RSS", fontsize=8)
    fig.suptitle("Throughput")
    return fig


def retrieval_figure(runs: list[RunRecord]) -> Figure:
    """R@1/5/10 both ways over training (the periodic evaluation, ending at the final one) and at the end."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = dict(zip(("i2t", "t2i", "end"), fig.subplots(1, 3), strict=True))
    for direction in _DIRECTIONS:
        ax = axes[direction]
        for i, run in enumerate(runs):
            final, end_step = run.final_retrieval, (run.train_rows[-1]["step"] if run.train_rows else None)
            for k in RECALL_KS:
                steps, values = _series(run, f"retrieval/{direction}_R@{k}", run.eval_rows)
                if final and end_step is not None:
                    steps, values = steps + [end_step], values + [final[direction][f"R@{k}"]]
                if steps:
                    ax.plot(steps, values, color=run_colour(i), linestyle=_K_STYLES[k], marker="o", markersize=3)
        if not ax.lines:
            _empty(ax, "no retrieval evaluation in this run\n(eval.split, eval.every)")
        else:
            _mark_simclr(ax, runs)
            ax.set_xlim(left=0)
            if not any(run.eval_rows for run in runs):
                _empty(ax, "only the final evaluation\n(periodic ones: eval.every)")
            styles = [Line2D([], [], color="black", linestyle=_K_STYLES[k], label=f"R@{k}") for k in RECALL_KS]
            ax.legend(handles=styles, fontsize=8)
        ax.set_title(f"{_DIRECTIONS[direction]} over training (%)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _final_bars(axes["end"], runs)
    fig.suptitle("Retrieval on the evaluation split")
    return fig


def _final_bars(ax, runs: list[RunRecord]) -> None:
    groups = [(d, k) for d in _DIRECTIONS for k in RECALL_KS]
    finished = [(i, run) for i, run in enumerate(runs) if run.final_retrieval]
    if not finished:
        _empty(ax, "no final evaluation (summary.json)")
    width = 0.8 / max(1, len(finished))
    for slot, (i, run) in enumerate(finished):
        values = [run.final_retrieval[d][f"R@{k}"] for d, k in groups]
        xs = [g + (slot - (len(finished) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width=width, color=run_colour(i), label=run.label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{d}\nR@{k}" for d, k in groups], fontsize=8)
    ax.set_title("at the end (%)")
    ax.grid(alpha=0.3, axis="y")
    if finished:
        ax.legend(fontsize=8)
