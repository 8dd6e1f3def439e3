"""The run folder: every file a run writes, named here and nowhere else, and the one loader of a
finished run.

``runs/<name>/`` holds, for pretraining:

- ``config.yaml``: the resolved config; ``tokenizer/`` and ``text_encoder_config.json``: what
  rebuilding the text tower needs, without downloads;
- ``metrics.jsonl`` (one line per logged step), ``notes.jsonl`` (what the run said, and its facts),
  ``tb/`` (TensorBoard events), ``wandb_id.txt`` (the Weights & Biases run it continues);
- ``checkpoints/`` (their layout: :mod:`.train.checkpoint`), ``run.lock`` (held while a run writes);
- at the end ``model.safetensors`` (the final weights), ``retrieval_<split>.json`` (the final
  retrieval, every query's rank) and, last, ``summary.json``: a run is finished when the files
  loading needs are there and its summary is (:meth:`RunFolder.is_finished`);
- ``report.html`` and its figures beside it.

A fine-tuning run folder holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch),
``results.json``, and ``best.safetensors`` (classification's best epoch) or ``model.safetensors``
and ``answers.txt`` (VQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RETRIEVAL_PREFIX = "retrieval_"


class RunNotFinished(FileNotFoundError):
    """A run folder without what a finished run leaves (its final weights, its summary, ...)."""


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def of(cls, path: str | Path) -> RunFolder:
        """The run folder at ``path``, or the one holding the file ``path`` (its ``model.safetensors``)."""
        path = Path(path)
        return cls(path.parent if path.is_file() else path)

    # --- what a run writes --------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def text_encoder_config(self) -> Path:
        return self.path / "text_encoder_config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def notes(self) -> Path:
        return self.path / "notes.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.path / "run.lock"

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    def retrieval(self, split: str) -> Path:
        """The final retrieval on ``split``, per query."""
        return self.path / f"{RETRIEVAL_PREFIX}{split}.json"

    # fine-tuning
    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def best_weights(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def answers(self) -> Path:
        return self.path / "answers.txt"

    @property
    def outputs(self) -> tuple[Path, ...]:
        """What a pretraining run writes as it trains, deleted by ``--overwrite`` (the config and the
        tokenizer are rewritten anyway)."""
        return self.checkpoints, self.metrics, self.tensorboard, self.summary, self.weights

    # --- its state ----------------------------------------------------------------------------------
    def never_started(self) -> bool:
        """No metrics and no checkpoint: what a failed start leaves (config, tokenizer, empty folders)."""
        metrics, ckpts = self.metrics, self.checkpoints
        return not (metrics.is_file() and metrics.stat().st_size) and not (ckpts.is_dir() and any(ckpts.iterdir()))

    def missing(self) -> Path | None:
        """The first file a finished pretraining run has and this folder lacks; None when finished."""
        for needed in (self.config, self.weights, self.tokenizer, self.text_encoder_config, self.summary):
            if not needed.exists():
                return needed
        return None

    def is_finished(self) -> bool:
        return self.missing() is None

    def require_finished(self, what: str = "run") -> RunFolder:
        """This folder, if a pretraining run finished in it; else :class:`RunNotFinished` saying what
        is missing (``what``: how the message names the run)."""
        if not self.path.exists():
            raise RunNotFinished(f"run folder not found: {self.path}")
        missing = self.missing()
        if missing is None:
            return self
        if missing == self.weights:
            raise RunNotFinished(
                f"{self.path} is not a finished {what}: no {missing.name} yet (training writes it at "
                "the end; `unimlip-fast pretrain ... --resume latest` finishes it)"
            )
        raise RunNotFinished(f"{self.path} is not a finished {what} (checkpoint incomplete: {missing} not found)")

    def read_summary(self) -> dict[str, Any]:
        """The run's summary; empty for a run that has not finished."""
        import json

        return json.loads(self.summary.read_text()) if self.summary.is_file() else {}

    # --- the model ----------------------------------------------------------------------------------
    def save_text_artifacts(self, model, tokenizer) -> None:
        """The tokenizer and the text encoder's config, so evaluation needs no hub access."""
        tokenizer.save_pretrained(str(self.tokenizer))
        model.text.encoder.config.to_json_file(str(self.text_encoder_config))

    def load_model(self, device="cpu"):
        """``(model, tokenizer, config)`` of the finished run, the model in eval mode on ``device``."""
        from transformers import AutoConfig, AutoTokenizer

        from .config import load_config
        from .model import assemble
        from .weights_file import read_safetensors

        self.require_finished()
        cfg = load_config(self.config)
        tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer))
        text_config = AutoConfig.from_pretrained(str(self.text_encoder_config))
        model = assemble(cfg, tokenizer, text_config, read_safetensors(self.weights), self.weights)
        return model.to(device).eval(), tokenizer, cfg
