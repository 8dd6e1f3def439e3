"""A run folder read back for the report: metrics, evaluations, summary, facts and notes.

Everything but ``config.yaml`` and ``metrics.jsonl`` is optional: a stopped run has no summary, a
run made before ``notes.jsonl`` existed has no facts, and the report says so rather than failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import read_config_tree
from ..run_folder import RunFolder

RETRIEVAL_KEYS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))


@dataclass
class RunRecord:
    path: Path
    label: str
    config: dict[str, Any]
    train_rows: list[dict[str, Any]]  # metrics rows with the loss terms, one per logged step
    eval_rows: list[dict[str, Any]]  # periodic retrieval rows ("retrieval/i2t_R@1", ...)
    summary: dict[str, Any] = field(default_factory=dict)
    facts: list[dict[str, Any]] = field(default_factory=list)  # one per start (resumes add one)
    notes: list[dict[str, Any]] = field(default_factory=list)  # what the run said: {"step", "note"}
    unreadable_lines: int = 0  # metrics/notes lines that are not JSON (a line cut short by a killed run)

    @property
    def final_retrieval(self) -> dict[str, Any] | None:
        return self.summary.get("retrieval")

    @property
    def last_facts(self) -> dict[str, Any]:
        return self.facts[-1] if self.facts else {}

    def notes_about(self, topic: str) -> list[str]:
        """The distinct notes that begin with ``topic:`` (e.g. "kernels", "data"), in order."""
        found = [n["note"].removeprefix(f"{topic}:").strip() for n in self.notes if n["note"].startswith(f"{topic}:")]
        return list(dict.fromkeys(found))

    def simclr_step(self) -> int | None:
        """Steps taken when the SimCLR phase began: as the run recorded it; for a finished run that did not,
        from its config and length; else the first step logged in the phase (log_every may make it late)."""
        first_logged = next((row["step"] for row in self.train_rows if row.get("phase") == "simclr"), None)
        if first_logged is None:
            return None
        if "simclr_step" in self.last_facts:
            return self.last_facts["simclr_step"]
        steps, epochs = self.summary.get("steps"), self.summary.get("epochs")
        if steps and epochs and not self.config.get("train", {}).get("max_steps"):  # a run of whole epochs
            from ..train.schedule import phase_start_step

            return phase_start_step(self.config["train"]["simclr_start"], steps // epochs, steps)
        return first_logged


def read_run(path: str | Path) -> RunRecord:
    path = Path(path)
    run = RunFolder(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder not found: {path}")
    if not run.metrics.is_file():
        raise FileNotFoundError(f"{path} is not a run folder: no {run.metrics.name} in it")
    config = read_config_tree(run.config) if run.config.is_file() else {}  # not plain YAML: the file named
    train_by_step, eval_by_step = {}, {}
    metrics, unreadable = _read_jsonl(run.metrics)
    for row in metrics:
        if "loss/total" in row:
            train_by_step[row["step"]] = row  # a resumed run may log a step twice: the last one counts
        if any(f"retrieval/{key}" in row for key in RETRIEVAL_KEYS):
            eval_by_step[row["step"]] = row
    summary = run.read_summary()
    entries, unreadable_notes = _read_jsonl(run.notes) if run.notes.is_file() else ([], 0)
    return RunRecord(
        path=path,
        label=path.resolve().name,
        config=config,
        train_rows=[train_by_step[s] for s in sorted(train_by_step)],
        eval_rows=[eval_by_step[s] for s in sorted(eval_by_step)],
        summary=summary,
        facts=[e["facts"] for e in entries if "facts" in e],
        notes=[e for e in entries if "note" in e],
        unreadable_lines=unreadable + unreadable_notes,
    )


def read_runs(paths: list[str | Path]) -> list[RunRecord]:
    runs = [read_run(p) for p in paths]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # two folders of the same name: tell them apart by path
        for run in runs:
            run.label = str(run.path)
    return runs


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a JSONL file, and how many lines were not JSON objects."""
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip():
            bad += 1
    return rows, bad
