"""The paper's ablation tables from one command: each row a set of overrides, N seeds a row.

Table 3 (what each kind of self-supervision adds, cumulatively): ITC alone; ITC with the strong
views fed through the image encoder but no SimCLR term; + SimCLR; + SimCLR with the image encoder's
BatchNorm statistics frozen; + feature perturbation (both perturbed ITC terms); all five terms.
Table 4 (each term removed from all five).

Every (row, seed) is one pretraining run in ``<out>/<row>/seed<S>/`` whose retrieval results come
from its ``summary.json``: a finished run is read, not run again, and an unfinished one resumes
from its latest checkpoint, so the command picks up where it stopped. ``results.json`` and
``table.md`` are rewritten after every run: R@1/5/10 both ways, mean and spread (sample standard
deviation) over the seeds, beside the paper's numbers where they are known.
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config

ITC_ONLY = ["loss.itc_img_fp=0", "loss.itc_txt_fp=0", "loss.simclr=0", "loss.mlm=0"]


@dataclass(frozen=True)
class Row:
    key: str  # folder name and JSON key
    label: str  # what the table shows
    overrides: tuple[str, ...]


TABLES: dict[int, list[Row]] = {
    3: [
        Row("itc", "ITC", tuple(ITC_ONLY)),
        Row("itc_views", "ITC, strong views fed (SimCLR weight 0)", (*ITC_ONLY, "data.strong_views=on",
                                                                     "loss.freeze_bn_stats=false")),
        Row("simclr", "+ SimCLR", ("loss.itc_img_fp=0", "loss.itc_txt_fp=0", "loss.mlm=0",
                                   "loss.freeze_bn_stats=false")),
        Row("simclr_frozen_bn", "+ SimCLR, BatchNorm statistics frozen", ("loss.itc_img_fp=0", "loss.itc_txt_fp=0",
                                                                          "loss.mlm=0", "loss.freeze_bn_stats=true")),
        Row("feature_perturbation", "+ feature perturbation", ("loss.mlm=0", "loss.freeze_bn_stats=true")),
        Row("all", "all five terms", ("loss.freeze_bn_stats=true",)),
    ],
    4: [
        Row("all", "all five terms", ("loss.freeze_bn_stats=true",)),
        Row("no_itc_img_fp", "- image feature perturbation", ("loss.itc_img_fp=0",)),
        Row("no_itc_txt_fp", "- text feature perturbation", ("loss.itc_txt_fp=0",)),
        Row("no_simclr", "- SimCLR", ("loss.simclr=0",)),
        Row("no_mlm", "- MLM", ("loss.mlm=0",)),
    ],
}

# The paper's retrieval numbers for these rows (R@1/5/10 both ways, in percent). They could not be
# found in any source available to this project when the command was written, so the column is
# left for them: fill in {row key: {"i2t": {"R@1": .., ..}, "t2i": {..}}} to print them beside ours.
PAPER: dict[int, dict[str, dict[str, dict[str, float]]]] = {3: {}, 4: {}}

METRICS = ("R@1", "R@5", "R@10")
DIRECTIONS = ("i2t", "t2i")


def rows_of(table: int, only: list[str] | None = None) -> list[Row]:
    if table not in TABLES:
        raise ConfigError(f"--table must be one of {sorted(TABLES)}, got {table}")
    rows = TABLES[table]
    if only:
        unknown = sorted(set(only) - {r.key for r in rows})
        if unknown:
            raise ConfigError(f"no row {unknown[0]!r} in Table {table}; its rows: {', '.join(r.key for r in rows)}")
        rows = [r for r in rows if r.key in only]
    return rows


def run_config(config: str | Path, row: Row, seed: int, overrides: list[str]):
    """The recipe, then the user's overrides, then the row's, then the seed."""
    cfg = load_config(config, [*overrides, *row.overrides, f"train.seed={seed}"])
    if not cfg.eval.split:
        raise ConfigError("ablate reads each run's retrieval: the recipe needs eval.split (e.g. eval.split=test)")
    return cfg


def finished_retrieval(run_dir: Path) -> dict[str, Any] | None:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    return json.loads(summary.read_text()).get("retrieval")


def run_ablation(config: str | Path, table: int, seeds: int, overrides: list[str], out: Path,
                 ds_config: str | None = None, only: list[str] | None = None,
                 train: Callable[..., dict[str, Any]] | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs what is missing of ``table`` (``seeds`` seeds a row, from the recipe's train.seed up) and
    writes ``results.json`` and ``table.md`` in ``out`` after each run. Returns the results.
    ``only``: a subset of the table's row keys. ``train``: the pretraining function (the engine's)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if train is None:
        from .train.engine import pretrain as train
    rows = rows_of(table, only)
    base_seed = load_config(config, overrides).train.seed
    configs = {(row.key, s): run_config(config, row, base_seed + s, overrides) for row in rows for s in range(seeds)}
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict[str, Any]]] = {row.key: {} for row in rows}
    for row in rows:
        for s in range(seeds):
            cfg = configs[(row.key, s)]
            run_dir = out / row.key / f"seed{cfg.train.seed}"
            results = finished_retrieval(run_dir)
            if results is None:
                # Stopped with a complete checkpoint: resume; before its first one: start it again.
                resume = "latest" if has_complete_checkpoint(run_dir / "checkpoints") else None
                log(f"Table {table}, row {row.key} ({row.label}), seed {cfg.train.seed}"
                    + (": resuming" if resume else ""))
                train(cfg, ds_config, run_dir, resume, overwrite=resume is None)
                results = finished_retrieval(run_dir)
                if results is None:
                    raise RuntimeError(f"{run_dir} finished without retrieval results in summary.json")
            else:
                log(f"Table {table}, row {row.key}, seed {cfg.train.seed}: done earlier, read from {run_dir}")
            runs[row.key][cfg.train.seed] = results
            if _is_main():
                write_tables(out, table, rows, runs, config, overrides, seeds)
    return tabulate(table, rows, runs, config, overrides, seeds)


def has_complete_checkpoint(ckpt_dir: Path) -> bool:
    from .train.checkpoint import checkpoint_folders, incompleteness

    return any(incompleteness(folder) is None for folder in checkpoint_folders(ckpt_dir))


def _is_main() -> bool:
    """Rank 0 under a launcher (or a plain process): the one that writes the tables."""
    return os.environ.get("RANK", "0") == "0"


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{direction: {metric: {"mean", "std", "min", "max"}}} over the seeds that have finished."""
    out = {}
    for direction in DIRECTIONS:
        out[direction] = {}
        for metric in METRICS:
            values = [r[direction][metric] for r in per_seed.values()]
            out[direction][metric] = {
                "mean": round(statistics.fmean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values),
            }
    return out


def tabulate(table: int, rows: list[Row], runs: dict, config, overrides: list[str], seeds: int) -> dict:
    results = {"table": table, "config": str(config), "overrides": list(overrides), "seeds_per_row": seeds,
               "paper_numbers_known": bool(PAPER[table]), "rows": {}}
    for row in rows:
        per_seed = runs[row.key]
        results["rows"][row.key] = {
            "label": row.label, "overrides": list(row.overrides), "seeds_done": sorted(per_seed),
            "per_seed": {str(s): {d: {m: r[d][m] for m in METRICS} for d in DIRECTIONS} for s, r in per_seed.items()},
            "summary": summarise(per_seed) if per_seed else None,
            "paper": PAPER[table].get(row.key),
            "n_queries": next(iter(per_seed.values()))["n"] if per_seed else None,
        }
    return results


def write_tables(out: Path, table: int, rows: list[Row], runs: dict, config, overrides: list[str],
                 seeds: int) -> None:
    results = tabulate(table, rows, runs, config, overrides, seeds)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(markdown_table(results))


def markdown_table(results: dict) -> str:
    head = ["row", "seeds"] + [f"{d} {m}" for d in DIRECTIONS for m in METRICS] + ["paper (i2t / t2i R@1/5/10)"]
    lines = [f"Table {results['table']}: retrieval, mean ± sample std over seeds (percent)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"].values():
        summary = row["summary"]
        cells = [row["label"], str(len(row["seeds_done"]))]
        for d in DIRECTIONS:
            for m in METRICS:
                cells.append(f"{summary[d][m]['mean']:.2f} ± {summary[d][m]['std']:.2f}" if summary else "–")
        paper = row["paper"]
        cells.append(" / ".join("/".join(f"{paper[d][m]:g}" for m in METRICS) for d in DIRECTIONS) if paper else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if not results["paper_numbers_known"]:
        lines += ["", "The paper's numbers for this table were not available here; its column is left empty."]
    lines += ["", f"Recipe: {results['config']}; overrides: {' '.join(results['overrides']) or 'none'}."]
    return "\n".join(lines) + "\n"
