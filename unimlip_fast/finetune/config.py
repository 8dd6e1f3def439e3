"""Fine-tuning recipes: typed defaults, a recipe file, dotted overrides (as pretraining's config).

Where the paper is specific its choice is the default; the rest are our choices, named here:
- classification: 224 px, batch 150 (NIH, MIMIC) / 190 (CheXpert), BCE, Adam, at most 64 epochs,
  early stopping on validation macro AUC (paper); lr 1e-4, patience 10 epochs, random resized crop
  of scale 0.8-1 and no flip for training (ours: the paper gives no lr).
- VQA: encoders at lr 5e-5, fusion and head at 5e-4, 20 learnable tokens, one fusion layer (paper,
  after M3AE); AdamW with weight decay 0.01, 10% linear warm-up then linear decay, batch 32,
  30 epochs, 224 px, questions cut at 40 tokens (ours, M3AE-like: the paper gives none of these).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ClassifyFormat, ConfigError, FinetuneInit, UncertaintyPolicy, VqaFormat, load_schema

PAPER_BATCH = {"nih": 150, "mimic": 150, "chexpert": 190}


@dataclass
class ClassifyData:
    format: ClassifyFormat = "nih"
    path: str = ""
    fraction: float = 1.0  # share of the training images with labels, drawn by patient
    uncertainty: UncertaintyPolicy = "u-ones"  # CheXpert/MIMIC -1.0
    frontal_only: bool = True  # CheXpert/MIMIC: frontal views only
    val_fraction: float = 0.1  # patients held out of the training pool where the release has no validation split
    split_seed: int = 0  # that hold-out's draw (fixed, so seeds vary the run, not the splits)
    image_size: int = 224
    train_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    num_workers: int = 2
    cache_images: bool = True  # decode every image once into memory (small data sets)


@dataclass
class ClassifyTrain:
    init: FinetuneInit = "pretrained"
    batch_size: int = 0  # global; 0: the paper's for the data set (150 NIH/MIMIC, 190 CheXpert)
    epochs: int = 64
    patience: int = 10  # epochs without a better validation macro AUC before stopping
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0  # label fraction, head and random initialisation, batch order, views


@dataclass
class ClassifyConfig:
    name: str = "classify"
    data: ClassifyData = field(default_factory=ClassifyData)
    train: ClassifyTrain = field(default_factory=ClassifyTrain)


@dataclass
class VQAData:
    format: VqaFormat = "vqa-rad"
    path: str = ""
    image_size: int = 224
    context_length: int = 40
    train_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    num_workers: int = 2
    cache_images: bool = True


@dataclass
class VQAModel:
    learnable_tokens: int = 20
    fusion_layers: int = 1
    fusion_heads: int = 0  # 0: the text width / 64
    dropout: float = 0.1


@dataclass
class VQATrain:
    init: FinetuneInit = "pretrained"
    batch_size: int = 32
    epochs: int = 30
    lr_encoders: float = 5e-5
    lr_fusion: float = 5e-4  # fusion layer, learnable tokens, projections and head
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    # Freeze the text tower and compute each question's states once (a compute budget choice for
    # CPUs; the paper fine-tunes both encoders).
    freeze_text: bool = False
    # Freeze the image encoder and compute each image's feature map once, from the eval view (no
    # augmentation); the same budget choice.
    freeze_image: bool = False
    seed: int = 0


@dataclass
class VQAConfig:
    name: str = "vqa"
    data: VQAData = field(default_factory=VQAData)
    model: VQAModel = field(default_factory=VQAModel)
    train: VQATrain = field(default_factory=VQATrain)


def _check_common(data, train) -> None:
    if not data.path:
        raise ConfigError("data.path is required (--data FORMAT:PATH)")
    if data.image_size % 32:
        raise ConfigError(f"data.image_size must be a multiple of 32, got {data.image_size}")
    lo, hi = data.train_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.train_scale must be two numbers with 0 < lo <= hi <= 1, got {data.train_scale}")
    if train.epochs < 1:
        raise ConfigError("train.epochs must be at least 1")


def load_classify_config(path: str | Path | None, overrides: list[str]) -> ClassifyConfig:
    cfg = load_schema(ClassifyConfig, path, overrides)
    if not 0 < cfg.data.fraction <= 1:
        raise ConfigError(f"data.fraction must lie in (0, 1], got {cfg.data.fraction}")
    _check_common(cfg.data, cfg.train)
    if cfg.train.batch_size == 0:
        cfg.train.batch_size = PAPER_BATCH[cfg.data.format]
    return cfg


def load_vqa_config(path: str | Path | None, overrides: list[str]) -> VQAConfig:
    cfg = load_schema(VQAConfig, path, overrides)
    _check_common(cfg.data, cfg.train)
    return cfg
