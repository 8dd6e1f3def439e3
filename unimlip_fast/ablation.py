"""The paper's ablation tables (Tables 3 and 4) from one command, in the paper's protocol.

Every row continues **one** trained ITC + MLM model, as the paper continues PMC-CLIP: the base is a
finished run folder or PMC-CLIP checkpoint given with ``--base``, or it is made once, resumably, in
``<out>/base/`` with PMC-CLIP's objective (ITC + MLM, 0.5 / 0.5, the weak view only) on the same
recipe and data. Each row then starts from the base's weights for the recipe's length, its second
phase (strong views, SimCLR, frozen statistics where the row has them) from its first step: a row
never trains its own warm-up. A row's terms take the paper's weights (0.167 for each ITC term, 0.5
for SimCLR and MLM), whatever the recipe's are.

Table 3 (BatchNorm statistics and SimCLR; every row ITC + MLM): the weak view only; + SimCLR,
statistics not frozen; the two strong views fed through the image encoder with SimCLR's weight 0,
not frozen; + SimCLR, statistics frozen. Table 4: ITC + MLM, then one term added at a time (image-
perturbed ITC; text-perturbed ITC; SimCLR with the statistics frozen), and all five. A row shared by
the tables (ITC + MLM; + SimCLR frozen) runs once under the same ``--out``.

Each (row, seed) is a normal run folder, ``<out>/<row>/seed<S>/``: a finished one is read, not run
again, an unfinished one resumes from its latest checkpoint, and a folder made with other settings
is refused. Each row is compared with row 1 (and Table 3's frozen row with naive SimCLR, Table 4's
all five with each single addition) by a paired bootstrap over the queries and the seeds, the same
queries scored by both rows: the difference in R@1 and R@10 with a 95% interval, and a verdict
against the paper's direction. ``results.json`` keeps every query's rank, so any interval can be
recomputed; ``table.md`` prints the paper's R@1 beside ours. Both are rewritten after every run.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import Config, ConfigError, LossConfig, dotted, load_config, to_dict
from .interop import is_foreign
from .run_folder import RunFolder

TERMS = ("itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm")
PAPER_WEIGHTS = {term: getattr(LossConfig(), term) for term in TERMS}  # 0.167 x 3, 0.5, 0.5
METRICS = ("R@1", "R@5", "R@10")
COMPARED = ("R@1", "R@10")  # the metrics each comparison's interval is given for
DIRECTIONS = ("i2t", "t2i")
BOOTSTRAP_SAMPLES = 10_000
RESULTS_FILE, TABLE_FILE = "results.json", "table.md"  # in the --out folder, beside the runs


@dataclass(frozen=True)
class Row:
    key: str  # folder name and JSON key
    label: str  # the paper's name for the row
    terms: frozenset[str]  # the loss terms on, each at the paper's weight
    strong_views: bool  # the two strong views go through the image encoder
    frozen: bool  # the image encoder's BatchNorm running statistics frozen
    paper_r1: tuple[float, float]  # the paper's R@1 (%), image->text and text->image, on ROCO

    def overrides(self) -> list[str]:
        """The row as config overrides; the second phase (views, SimCLR, frozen statistics) from step 0."""
        weights = [f"loss.{t}={PAPER_WEIGHTS[t] if t in self.terms else 0}" for t in TERMS]
        views = "off" if not self.strong_views else "auto" if "simclr" in self.terms else "on"
        return [
            *weights,
            f"data.strong_views={views}",
            f"loss.freeze_bn_stats={str(self.frozen).lower()}",
            "train.simclr_start=0",
        ]


_ITC_MLM = frozenset({"itc", "mlm"})
ITC_MLM = Row("itc_mlm", "ITC + MLM", _ITC_MLM, False, False, (22.2, 21.7))
SIMCLR_FROZEN = Row(
    "simclr_frozen", "ITC + MLM + SimCLR, statistics frozen", _ITC_MLM | {"simclr"}, True, True, (25.7, 24.0)
)
TABLES: dict[int, list[Row]] = {
    3: [
        ITC_MLM,
        Row("simclr", "ITC + MLM + SimCLR, statistics not frozen", _ITC_MLM | {"simclr"}, True, False, (5.0, 1.0)),
        Row(
            "views_no_simclr",
            "ITC + MLM, strong views fed (SimCLR weight 0), not frozen",
            _ITC_MLM,
            True,
            False,
            (4.0, 6.9),
        ),
        SIMCLR_FROZEN,
    ],
    4: [
        ITC_MLM,
        Row("itc_img_fp", "ITC + MLM + image-perturbed ITC", _ITC_MLM | {"itc_img_fp"}, False, False, (23.2, 23.3)),
        Row("itc_txt_fp", "ITC + MLM + text-perturbed ITC", _ITC_MLM | {"itc_txt_fp"}, False, False, (23.8, 23.4)),
        SIMCLR_FROZEN,
        Row("all", "all five terms", frozenset(TERMS), True, True, (25.9, 24.5)),
    ],
}
# Beyond "each row against row 1": the paper's "freezing restores it" and "all five is best".
EXTRA_COMPARISONS: dict[int, list[tuple[str, str]]] = {
    3: [("simclr_frozen", "simclr")],
    4: [("all", "itc_img_fp"), ("all", "itc_txt_fp"), ("all", "simclr_frozen")],
}
# The base: PMC-CLIP's own objective (ITC + MLM at 0.5 / 0.5, the weak view only).
BASE_OVERRIDES = [
    "loss.itc=0.5",
    "loss.itc_img_fp=0",
    "loss.itc_txt_fp=0",
    "loss.simclr=0",
    "loss.mlm=0.5",
    "data.strong_views=off",
]


def parse_tables(text: str) -> list[int]:
    """``"3"``, ``"4"`` or ``"3,4"`` -> the table numbers."""
    try:
        tables = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        tables = []
    if not tables or any(t not in TABLES for t in tables):
        raise ConfigError(
            f"--table takes {', '.join(map(str, sorted(TABLES)))} or several comma-separated, got {text!r}"
        )
    return sorted(set(tables))


def rows_of(tables: list[int], only: list[str] | None = None) -> list[Row]:
    """The distinct rows of ``tables`` in table order (``only``: a subset of their keys)."""
    rows = list({row.key: row for t in tables for row in TABLES[t]}.values())
    if only:
        unknown = sorted(set(only) - {r.key for r in rows})
        if unknown:
            raise ConfigError(
                f"no row {unknown[0]!r} in Table {', '.join(map(str, tables))}; its rows: "
                f"{', '.join(r.key for r in rows)}"
            )
        rows = [r for r in rows if r.key in only]
    return rows


def base_config(config: str | Path, overrides: list[str], base_epochs: int | None) -> Config:
    """The recipe, the user's overrides, then PMC-CLIP's objective (and the base's own length)."""
    length = [f"train.epochs={base_epochs}", "train.max_steps=0"] if base_epochs else []
    return _with_eval(load_config(config, [*overrides, *BASE_OVERRIDES, *length]))


def run_config(config: str | Path, row: Row, seed: int, overrides: list[str], base: str | Path) -> Config:
    """The recipe, the user's overrides, the row, the seed, and the base it continues."""
    return _with_eval(
        load_config(
            config,
            [
                *overrides,
                *row.overrides(),
                f"train.seed={seed}",
                f"model.init_from={base if is_foreign(base) else Path(base).resolve()}",
            ],
        )
    )


def _with_eval(cfg: Config) -> Config:
    if not cfg.eval.split:
        raise ConfigError("ablate reads each run's retrieval: the recipe needs eval.split (e.g. eval.split=dev+test)")
    return cfg


@dataclass(frozen=True)
class AblationPlan:
    """What ``ablate`` runs: the recipe ``config`` with ``overrides``, the rows of ``tables`` (``only``:
    a subset of their keys), ``seeds`` seeds a row, into ``out``; DeepSpeed's ``ds_config``; the
    ``base`` run every row continues (None: made in ``out/base``, ``base_epochs`` long)."""

    config: str | Path
    tables: list[int]
    seeds: int
    overrides: list[str]
    out: Path
    ds_config: str | None = None
    only: list[str] | None = None
    base: str | Path | None = None
    base_epochs: int | None = None


def run_ablation(
    plan: AblationPlan, train: Callable[..., dict[str, Any]] | None = None, log: Callable[[str], None] = print
) -> dict:
    """Makes (or takes) the base, runs what is missing of the plan's tables (its seeds a row, from the
    recipe's train.seed up, every row's first seed before any second), and writes ``results.json`` and
    ``table.md`` in its ``out`` after each run."""
    config, tables, seeds, overrides, out = plan.config, plan.tables, plan.seeds, plan.overrides, plan.out
    ds_config = plan.ds_config
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if train is None:
        from .train.engine import pretrain as train
    rows = rows_of(tables, plan.only)
    first_seed = load_config(config, overrides).train.seed
    out.mkdir(parents=True, exist_ok=True)
    base_path = _base(plan, train, log)
    configs = {
        (row.key, s): run_config(config, row, first_seed + s, overrides, base_path)
        for row in rows
        for s in range(seeds)
    }
    runs: dict[str, dict[int, dict[str, Any]]] = {row.key: {} for row in rows}
    # Seed by seed, every row once per round: a run stopped part-way has every row on the same seeds,
    # so each comparison is paired on all it has.
    for s in range(seeds):
        for row in rows:
            cfg = configs[(row.key, s)]
            run_dir = out / row.key / f"seed{cfg.train.seed}"
            runs[row.key][cfg.train.seed] = _finished_or_run(
                cfg, run_dir, ds_config, train, log, f"row {row.key} ({row.label}), seed {cfg.train.seed}"
            )
            if _is_main():
                write_tables(plan, rows, runs, base_path)
    return tabulate(tables, rows, runs, config, overrides, seeds, base_path)


def _base(plan: AblationPlan, train: Callable, log: Callable[[str], None]) -> Path:
    """The base every row continues: ``--base`` as given, or ``<out>/base`` made (or finished) now."""
    base = plan.base
    if base is not None:
        path = Path(base)
        if not path.exists():
            raise ConfigError(f"--base {base}: no such run folder or checkpoint")
        if path.is_dir() and not RunFolder(path).weights.is_file():
            raise ConfigError(f"--base {base}: not a finished run (no {RunFolder(path).weights.name})")
        log(f"base: {path} (given)")
        return path
    cfg = base_config(plan.config, plan.overrides, plan.base_epochs)
    run_dir = plan.out / "base"
    _finished_or_run(cfg, run_dir, plan.ds_config, train, log, f"base (ITC + MLM, {cfg.train.epochs} epochs)")
    return run_dir


def _finished_or_run(
    cfg: Config, run_dir: Path, ds_config: str | None, train: Callable, log: Callable[[str], None], what: str
) -> dict[str, Any]:
    """The retrieval results of a finished run in ``run_dir`` (with per-query ranks), else runs it
    (resuming from a complete checkpoint) first. A folder holding another config is refused."""
    _refuse_other_settings(run_dir, cfg)
    results = finished_retrieval(run_dir, cfg.eval.split)
    if results is not None:
        log(f"{what}: done earlier, read from {run_dir}")
        return results
    resume = "latest" if has_complete_checkpoint(RunFolder(run_dir).checkpoints) else None
    log(f"{what}" + (": resuming" if resume else ""))
    train(cfg, ds_config, run_dir, resume, overwrite=resume is None)
    results = finished_retrieval(run_dir, cfg.eval.split)
    if results is None:
        raise RuntimeError(f"{run_dir} finished without per-query retrieval results")
    return results


def _refuse_other_settings(run_dir: Path, cfg: Config) -> None:
    saved = RunFolder(run_dir).config
    if not saved.is_file():
        return
    theirs, ours = dotted(yaml.safe_load(saved.read_text()) or {}), dotted(to_dict(cfg))
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in differ[:3])
        raise ConfigError(f"{run_dir} holds a run with other settings ({shown}): give another --out, or delete it")


def finished_retrieval(run_dir: Path, split: str) -> dict[str, Any] | None:
    """A finished run's final retrieval (per-query ranks included)."""
    run = RunFolder(run_dir)
    path = run.retrieval(split)
    if not run.summary.is_file() or not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if "per_query" in results else None


def has_complete_checkpoint(ckpt_dir: Path) -> bool:
    from .train.checkpoint import checkpoint_folders, incompleteness

    return any(incompleteness(folder) is None for folder in checkpoint_folders(ckpt_dir))


def _is_main() -> bool:
    """Rank 0 under a launcher (or a plain process): the one that writes the tables."""
    return os.environ.get("RANK", "0") == "0"


# ------------------------------------------------------------------------------------- statistics


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
                "min": min(values),
                "max": max(values),
            }
    return out


def recall_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """[..., Q] ranks -> [...] R@k in percent."""
    return 100.0 * (ranks <= k).mean(axis=-1)


def paired_bootstrap(
    ranks_a: np.ndarray, ranks_b: np.ndarray, k: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """R@k of A minus R@k of B, averaged over the seeds, and its 95% percentile interval.

    ``ranks_a``, ``ranks_b``: [S, Q] ranks of the same Q queries from S paired seeds. Each bootstrap
    sample draws S seeds and Q queries with replacement, the same draw for both rows, so what the
    two rows share (the queries, the seed's data order) cancels in the difference."""
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired ranks must be [seeds, queries] of one shape, got {a.shape} and {b.shape}")
    hits = (a <= k).astype(np.float64) - (b <= k).astype(np.float64)  # [S, Q] per-query difference
    n_seeds, n_queries = hits.shape
    rng = np.random.default_rng(seed)
    estimates = np.empty(samples)
    for start in range(0, samples, 500):  # in chunks: [chunk, S, Q] index arrays stay small
        n = min(500, samples - start)
        seed_draw = rng.integers(0, n_seeds, size=(n, n_seeds))
        query_draw = rng.integers(0, n_queries, size=(n, n_queries))
        drawn = hits[seed_draw[:, :, None], query_draw[:, None, :]]  # [n, S, Q]
        estimates[start : start + n] = 100.0 * drawn.mean(axis=(1, 2))
    low, high = np.percentile(estimates, [2.5, 97.5])
    return 100.0 * float(hits.mean()), float(low), float(high)


def verdict(low: float, high: float, expected: float) -> str:
    """The interval against the paper's direction (``expected``: the sign of the paper's difference)."""
    if low > 0 or high < 0:
        return "holds" if (low > 0) == (expected > 0) else "reversed"
    return "cannot tell"


def compare(rows: dict[str, Row], runs: dict, row_key: str, against: str) -> dict[str, Any] | None:
    """``row_key`` against ``against`` on the seeds both have finished, or None before there are any."""
    seeds = sorted(set(runs.get(row_key, {})) & set(runs.get(against, {})))
    if not seeds:
        return None
    result: dict[str, Any] = {"row": row_key, "against": against, "seeds": seeds}
    for d, direction in enumerate(DIRECTIONS):
        expected = rows[row_key].paper_r1[d] - rows[against].paper_r1[d]
        stacked = []
        for key in (row_key, against):
            per_query = [runs[key][s]["per_query"] for s in seeds]
            if any(q["keys"] != per_query[0]["keys"] for q in per_query) or (
                stacked and per_query[0]["keys"] != stacked[0][1]
            ):
                raise RuntimeError(f"rows {row_key} and {against} were evaluated on different queries")
            stacked.append((np.array([q[direction] for q in per_query]), per_query[0]["keys"]))
        for metric in COMPARED:
            diff, low, high = paired_bootstrap(stacked[0][0], stacked[1][0], int(metric[2:]))
            result[f"{direction} {metric}"] = {
                "difference": round(diff, 2),
                "ci95": [round(low, 2), round(high, 2)],
                "paper_difference": round(expected, 2),
                "verdict": verdict(low, high, expected),
            }
    return result


def comparisons_of(table: int) -> list[tuple[str, str]]:
    first = TABLES[table][0].key
    return [(row.key, first) for row in TABLES[table][1:]] + EXTRA_COMPARISONS.get(table, [])


# ----------------------------------------------------------------------------------------- tables


def tabulate(
    tables: list[int], rows: list[Row], runs: dict, config, overrides: list[str], seeds: int, base: Path
) -> dict:
    by_key = {row.key: row for t in tables for row in TABLES[t]}
    results: dict[str, Any] = {
        "config": str(config),
        "overrides": list(overrides),
        "seeds_per_row": seeds,
        "base": str(base),
        "bootstrap_samples": BOOTSTRAP_SAMPLES,
        "rows": {},
        "tables": {},
    }
    for row in rows:
        per_seed = runs[row.key]
        results["rows"][row.key] = {
            "label": row.label,
            "terms": sorted(row.terms),
            "strong_views": row.strong_views,
            "frozen": row.frozen,
            "overrides": row.overrides(),
            "seeds_done": sorted(per_seed),
            "per_seed": {str(s): {d: {m: r[d][m] for m in METRICS} for d in DIRECTIONS} for s, r in per_seed.items()},
            "summary": summarise(per_seed) if per_seed else None,
            "paper_r1": dict(zip(DIRECTIONS, row.paper_r1)),
            "n_queries": next(iter(per_seed.values()))["n"] if per_seed else None,
            "per_query": {str(s): r["per_query"] for s, r in per_seed.items()},
        }
    for table in tables:
        keys = [row.key for row in TABLES[table] if row.key in runs]
        comparisons = [compare(by_key, runs, a, b) for a, b in comparisons_of(table) if a in runs and b in runs]
        results["tables"][str(table)] = {"rows": keys, "comparisons": [c for c in comparisons if c]}
    return results


def write_tables(plan: AblationPlan, rows: list[Row], runs: dict, base: Path) -> None:
    results = tabulate(plan.tables, rows, runs, plan.config, plan.overrides, plan.seeds, base)
    out = plan.out
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    (out / TABLE_FILE).write_text(markdown_tables(results))


def markdown_tables(results: dict) -> str:
    lines = []
    for table, content in results["tables"].items():
        lines += _markdown_table(int(table), content, results["rows"]) + [""]
    n_queries = {r["n_queries"] for r in results["rows"].values() if r["n_queries"]}
    lines += [
        f"Ours: mean ± sample std over the seeds (percent), {'/'.join(map(str, sorted(n_queries))) or '?'} "
        "queries each way. The paper's numbers: ROCO retrieval R@1 after pretraining on ROCO at full "
        "scale, a reference for the direction, not a like-for-like comparison.",
        f"Intervals: 95%, paired bootstrap over queries and seeds ({results['bootstrap_samples']} samples). "
        "Verdict: the paper's direction holds (interval on its side of 0), is reversed (on the other "
        "side), or cannot be told (the interval holds 0).",
        f"Base: {results['base']}. Recipe: {results['config']}; overrides: {' '.join(results['overrides']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def _markdown_table(table: int, content: dict, rows: dict) -> list[str]:
    head = [
        "row",
        "seeds",
        "paper i2t R@1",
        "ours i2t R@1",
        "paper t2i R@1",
        "ours t2i R@1",
        "ours i2t R@5 / R@10",
        "ours t2i R@5 / R@10",
    ]
    lines = [f"Table {table}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda s, d, m: f"{s[d][m]['mean']:.1f} ± {s[d][m]['std']:.1f}"
    for n, key in enumerate(content["rows"], start=1):
        row, s = rows[key], rows[key]["summary"]
        cells = [f"{n}. {row['label']}", str(len(row["seeds_done"]))]
        for d in DIRECTIONS:
            cells += [f"{row['paper_r1'][d]:.1f}", fmt(s, d, "R@1") if s else "–"]
        cells += [f"{fmt(s, d, 'R@5')} / {fmt(s, d, 'R@10')}" if s else "–" for d in DIRECTIONS]
        lines.append("| " + " | ".join(cells) + " |")
    if content["comparisons"]:
        head = ["comparison", "paper (i2t / t2i R@1)"] + [
            f"{d} {m}: ours [95% CI], verdict" for d in DIRECTIONS for m in COMPARED
        ]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in content["comparisons"]:
            paper = " / ".join(f"{c[f'{d} R@1']['paper_difference']:+.1f}" for d in DIRECTIONS)
            cells = [f"{c['row']} vs {c['against']}", paper]
            for d in DIRECTIONS:
                for m in COMPARED:
                    x = c[f"{d} {m}"]
                    cells.append(f"{x['difference']:+.1f} [{x['ci95'][0]:+.1f}, {x['ci95'][1]:+.1f}], {x['verdict']}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines
