"""The run report: one self-contained HTML page with its PNG figures beside it.

``write_report([run])`` draws the loss terms (SimCLR phase start marked, learning rate and logit
scale beneath), throughput, retrieval over training and at the end, a retrieval gallery from the
evaluation split, and the run's facts. Several runs are drawn on the same axes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DataConfig
from ..run_folder import RunFolder
from .figures import loss_figure, retrieval_figure, save_png, throughput_figure
from .gallery import Gallery, build_gallery, caption_queries_figure, image_queries_figure
from .page import render_page
from .runs import RunRecord, read_run, read_runs

__all__ = ["ReportFiles", "RunRecord", "read_run", "write_report"]


@dataclass
class ReportFiles:
    html: Path
    figures: dict[str, Path]  # figure name -> PNG beside the HTML
    gallery_json: Path  # each gallery's queries, hits and which hit is the true one
    problems: list[str] = field(default_factory=list)  # what could not be drawn, and why


def default_output(run_dirs: list[str | Path]) -> Path:
    """``RUN/report.html`` for one run, ``./report.html`` for an overlay of several."""
    return RunFolder(Path(run_dirs[0]) if len(run_dirs) == 1 else Path(".")).report


def write_report(
    run_dirs: list[str | Path],
    output: str | Path | None = None,
    device: torch.device | str = "cpu",
    data: DataConfig | None = None,
    split: str | None = None,
) -> ReportFiles:
    """The report of ``run_dirs`` at ``output``; ``data``/``split`` override the runs' evaluation split
    for the gallery (a copied run whose data path is relative to where it was trained)."""
    runs = read_runs(run_dirs)
    output = Path(output) if output else default_output(run_dirs)
    output.parent.mkdir(parents=True, exist_ok=True)

    def png(name: str) -> Path:
        return output.parent / f"{output.stem}_{name}.png"

    files = ReportFiles(html=output, figures={}, gallery_json=output.parent / f"{output.stem}_gallery.json")

    drawn = [
        ("losses", "Loss terms, learning rate and logit scale", loss_figure),
        ("throughput", "Throughput", throughput_figure),
        ("retrieval", "Retrieval over training", retrieval_figure),
    ]
    for name, _, draw in drawn:
        files.figures[name] = save_png(draw(runs), png(name))

    galleries, gallery_json = [], []
    for n, run in enumerate(runs):
        suffix = f"_{n + 1}" if len(runs) > 1 else ""
        try:
            if not (split or run.config.get("eval", {}).get("split")):
                raise ValueError("the run has no evaluation split (eval.split is empty); give one with --split")
            gallery = build_gallery(run.path, device, data, split)
        except (OSError, ValueError, RuntimeError) as e:  # no model yet, data not found, no eval split
            reason = f"{type(e).__name__}: {e}"
            files.problems.append(f"{run.label}: no retrieval gallery ({reason})")
            galleries.append((run, [], reason))
            gallery_json.append({"run": str(run.path), "missing": reason})
            continue
        images = _draw_gallery(gallery, suffix, png, files)
        galleries.append((run, images, None))
        gallery_json.append({"run": str(run.path), **gallery.to_json()})
    files.gallery_json.write_text(json.dumps(gallery_json, indent=1))

    figures = [(name, title, files.figures[name]) for name, title, _ in drawn]
    files.html.write_text(render_page(runs, figures, galleries), encoding="utf-8")
    return files


def _draw_gallery(gallery: Gallery, suffix: str, png, files: ReportFiles) -> list[tuple[str, Path]]:
    images = []
    for name, title, draw in (
        ("gallery_i2t", "images with their top captions", image_queries_figure),
        ("gallery_t2i", "captions with their top images", caption_queries_figure),
    ):
        files.figures[name + suffix] = save_png(draw(gallery), png(name + suffix))
        images.append((title, files.figures[name + suffix]))
    return images
