"""The report as one self-contained HTML page: figures embedded as base64 PNG, no script, no network."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path
from typing import Any

import yaml

from ..config import dotted
from .figures import run_colour
from .runs import RunRecord

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1320px;
       color: #1f2328; padding: 0 1em; }
h1 { font-size: 1.5em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
img { max-width: 100%; border: 1px solid #eaeef2; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; font-size: .85em; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: middle; }
.muted { color: #656d76; } .problem { color: #9a6700; }
"""
_RECALL_COLUMNS = ("R@1", "R@5", "R@10", "median_rank")


def render_page(
    runs: list[RunRecord],
    figures: list[tuple[str, str, Path]],
    galleries: list[tuple[RunRecord, list[tuple[str, Path]], str | None]],
) -> str:
    """``figures``: (anchor, title, png); ``galleries``: (run, [(title, png)], reason it is missing or None)."""
    title = "Run report: " + ", ".join(run.label for run in runs)
    written = datetime.datetime.now(datetime.timezone.utc)
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>',
        '<link rel="icon" href="data:,">',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">unimlip-fast, written {written:%Y-%m-%d %H:%M} UTC '
        f"from {', '.join(_e(str(run.path)) for run in runs)}</p>",
        '<h2 id="results">Retrieval at the end</h2>',
        _final_table(runs),
    ]
    for anchor, heading, png in figures:
        parts += [f'<h2 id="{anchor}">{_e(heading)}</h2>', _img(png, heading)]
    for run, images, reason in galleries:
        heading = "Retrieval examples" + (f": {run.label}" if len(runs) > 1 else "")
        parts.append(f'<h2 id="gallery">{_e(heading)}</h2>')
        if reason:
            parts.append(f'<p class="problem">No gallery: {_e(reason)}</p>')
        parts += [_img(png, alt) for alt, png in images]
    parts += [
        '<h2 id="facts">Run facts</h2>',
        _facts_table(runs),
        _config_section(runs),
        _notes_section(runs),
        "</body></html>",
    ]
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<p><img alt="{_e(alt)}" data-file="{_e(png.name)}" src="data:image/png;base64,{data}"></p>'


def _run_heading(i: int, run: RunRecord) -> str:
    return f'<span class="swatch" style="background:{run_colour(i)}"></span>{_e(run.label)}'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _final_table(runs: list[RunRecord]) -> str:
    rows = []
    for i, run in enumerate(runs):
        final = run.final_retrieval
        if not final:
            rows.append(
                [_run_heading(i, run), '<span class="muted">no final evaluation</span>']
                + [""] * (2 * len(_RECALL_COLUMNS))
            )
            continue
        rows.append(
            [_run_heading(i, run), f"{_e(final.get('split', '?'))}, n={final['n']}"]
            + [f"{final[d][c]:g}" for d in ("i2t", "t2i") for c in _RECALL_COLUMNS]
        )
    header = ["run", "split"] + [f"{d} {c}" for d in ("image&rarr;text", "text&rarr;image") for c in _RECALL_COLUMNS]
    return _table(header, rows)


def _facts_table(runs: list[RunRecord]) -> str:
    header = ["", *(_run_heading(i, run) for i, run in enumerate(runs))]
    facts = [_facts_of(run) for run in runs]
    names = list(dict.fromkeys(name for f in facts for name in f))
    return _table(header, [[name, *(f.get(name, "") for f in facts)] for name in names])


def _facts_of(run: RunRecord) -> dict[str, str]:
    """Fact name -> HTML cell for one run; what the run did not record is said to be missing."""
    facts, cfg, summary = run.last_facts, run.config, run.summary
    missing = '<span class="muted">not recorded by this run</span>'
    first = run.facts[0] if run.facts else {}
    last_row = run.train_rows[-1] if run.train_rows else {}
    total = facts.get("total_steps")
    status = (
        f"finished: {summary['steps']} steps ({summary.get('epochs', '?')} epochs) in {summary['wall_s']} s"
        if summary
        else f"not finished: last logged step {last_row.get('step', 0)}" + (f" of {total}" if total else "")
    )
    data_cfg = cfg.get("data", {})
    kernels, data_notes = run.notes_about("kernels"), run.notes_about("data")
    nonfinite = summary.get("nonfinite_steps", last_row.get("nonfinite_steps"))
    nonfinite_notes = [f"step {n['step']}: {n['note']}" for n in run.notes if n["note"].startswith("non-finite")]
    out = {
        "folder": _e(run.path),
        "status": _e(status),
        "commit": _commits(run) or missing,
        "started": _e(first["started"]) if first else missing,
        "resumed": (
            _e(", ".join(f"{f['resumed_from']} at step {f['resumed_at_step']}" for f in run.facts[1:])) or "no"
            if facts
            else missing
        ),
        "devices": _e(f"{facts['world_size']} x {facts['device']}") if facts else missing,
        "precision": _e(facts["precision"]) if facts else missing,
        "ZeRO stage": _e(facts["zero_stage"]) if facts else missing,
        "kernels (chosen, why)": "<br>".join(map(_e, kernels))
        or f"{missing}; configured model.kernels={_e(cfg.get('model', {}).get('kernels', '?'))}",
        "data backend (chosen, why)": "<br>".join(map(_e, data_notes))
        or f"{missing}; configured data.backend={_e(data_cfg.get('backend', '?'))}",
        "data set": _e(
            f"{data_cfg.get('format', '?')} {data_cfg.get('path', '')} split {data_cfg.get('split', '?')}"
            + (f", {facts['pairs']} pairs" if "pairs" in facts else "")
        ),
        "batch, steps": _e(
            f"batch {cfg.get('train', {}).get('batch_size', '?')}"
            + (f", {facts['steps_per_epoch']} steps/epoch, {total} steps" if total else "")
        ),
        "SimCLR phase from step": _e(run.simclr_step() if run.simclr_step() is not None else "none"),
        "records skipped while reading": _counts(summary.get("skipped_records", facts.get("skipped_records"))),
        "samples skipped in training": (
            _counts(summary["skipped_samples"])
            if summary
            else _e(f"{last_row.get('skipped_samples', 0)} (by reason at the end of the run)")
        ),
        "non-finite steps (skipped)": _e(nonfinite if nonfinite is not None else "?")
        + "".join(f"<br>{_e(n)}" for n in nonfinite_notes),
        "versions": _e(", ".join(f"{k} {v}" for k, v in facts.get("versions", {}).items())) or missing,
    }
    if run.unreadable_lines:
        out["unreadable log lines"] = f'<span class="problem">{run.unreadable_lines} (not JSON; skipped)</span>'
    return out


def _commits(run: RunRecord) -> str:
    """The commit the run started from, and any other that a resume ran."""
    commits = list(dict.fromkeys(f["commit"] for f in run.facts))
    return _e(commits[0] + "".join(f"; resumed on {c}" for c in commits[1:])) if commits else ""


def _counts(counts: dict[str, int] | None) -> str:
    if counts is None:
        return '<span class="muted">not recorded by this run</span>'
    return _e(", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()) if n) or "none")


def _config_section(runs: list[RunRecord]) -> str:
    parts = ['<h2 id="config">Config</h2>']
    if len(runs) > 1:
        flat = [dotted(run.config) for run in runs]
        keys = sorted({k for f in flat for k in f if len({repr(g.get(k)) for g in flat}) > 1})
        parts.append("<p>Keys that differ between the runs:</p>" if keys else "<p>The runs' configs are identical.</p>")
        if keys:
            parts.append(
                _table(
                    ["key", *(_run_heading(i, r) for i, r in enumerate(runs))],
                    [[_e(k), *(_e(f.get(k, "(absent)")) for f in flat)] for k in keys],
                )
            )
    for run in runs:
        parts.append(
            f"<details><summary>config.yaml of {_e(run.label)}</summary>"
            f"<pre>{_e(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>"
        )
    return "\n".join(parts)


def _notes_section(runs: list[RunRecord]) -> str:
    parts = ['<h2 id="notes">What the run said</h2>']
    for run in runs:
        lines = "\n".join(f"step {n['step']}: {n['note']}" for n in run.notes)
        parts.append(
            f"<details{' open' if len(runs) == 1 else ''}><summary>{_e(run.label)}: {len(run.notes)} notes"
            f"</summary><pre>{_e(lines) or 'none recorded (notes.jsonl absent)'}</pre></details>"
        )
    return "\n".join(parts)
