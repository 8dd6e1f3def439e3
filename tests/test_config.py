from dataclasses import dataclass, field

import pytest

from unimlip_fast.config import Config, ConfigError, load_config, load_schema, save_config, valid_keys
from unimlip_fast.finetune.config import load_classify_config, load_vqa_config
from unimlip_fast.train.ds_config import load_ds_config, resolve_ds_config

from .helpers import REPO


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_stepz=3"])
    assert "train.max_stepz" in str(e.value) and "train.max_steps" in str(e.value)


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  batch_size: 8\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(recipe)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "expected an integer"),
        ("train.lr=fast", "expected a number"),
        ("loss.freeze_bn_stats=maybe", "true/false"),
        ("model.vision_layers=3", "expected a list"),
        ("data.format=dicom", "data.format"),
        ("train.max_steps", "KEY=VALUE"),
        ("loss.simclr_negatives=same-view", "loss.simclr_negatives"),
        ("data.strong_views=sometimes", "data.strong_views"),
        ("data.strong_views=off", "leaves SimCLR without its views"),
        ("data.weak_scale=[0.9]", "data.weak_scale"),
        ("data.strong_scale=[0.5,0.2]", "data.strong_scale"),
    ],
)
def test_override_types_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overrides_are_typed_and_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "train.max_steps=30",
            "train.lr=3e-4",
            "model.vision_layers=[1,2,2,1]",
            "loss.freeze_bn_stats=false",
            "data.format=phantom",
        ],
    )
    assert cfg.train.max_steps == 30 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.vision_layers == [1, 2, 2, 1] and cfg.loss.freeze_bn_stats is False
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert "model.text.encoder" in valid_keys()


def test_missing_recipe_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/recipe.yaml")


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    load_config(recipe)


@pytest.mark.parametrize("ds", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs_resolve(ds):
    cfg = load_config(None, ["train.batch_size=64"])
    resolved = resolve_ds_config(load_ds_config(str(ds)), cfg, world_size=2)
    assert resolved["train_micro_batch_size_per_gpu"] == 32
    assert resolved["gradient_accumulation_steps"] == 1


def test_deepspeed_config_conflicts_are_errors(tmp_path):
    cfg = load_config(None, ["train.batch_size=64"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_ds_config({"train_batch_size": 32}, cfg, 1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        resolve_ds_config({"gradient_accumulation_steps": 4}, cfg, 1)
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_ds_config({"optimizer": {"type": "Adam"}}, cfg, 1)
    with pytest.raises(ConfigError, match="divisible"):
        resolve_ds_config({}, cfg, 3)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))


def test_the_papers_views_and_simclr_are_the_defaults():
    cfg = load_config(None, [])
    assert cfg.data.weak_scale == [0.9, 1.0] and cfg.data.strong_scale == [0.9, 1.0]
    assert cfg.data.strong_views == "auto" and cfg.loss.simclr_negatives == "cross-view"
    assert load_config(None, ["data.strong_views=off", "loss.simclr=0"]).data.strong_views == "off"


@dataclass
class _TextSteps:
    max_steps: str = ""  # an int in pretraining's Config, text here


@dataclass
class _OtherSchema:
    train: _TextSteps = field(default_factory=_TextSteps)


def test_overrides_are_parsed_with_their_own_schema():
    """An override is read as text or YAML by the schema it is applied to, not by pretraining's Config."""
    assert load_schema(_OtherSchema, None, ["train.max_steps=007"]).train.max_steps == "007"
    with pytest.raises(ConfigError, match="train.init must be one of pretrained, random, got 'off'"):
        load_classify_config(None, ["data.path=/x", "train.init=off"])
    assert load_vqa_config(None, ["data.path=/x", "train.init=random"]).train.init == "random"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.fast=sometimes", "train.fast must be true, false or auto, got 'sometimes'"),
        ("train.report_to=[tensorboard, mlflow]", r"train.report_to\[1\] must be one of tensorboard, wandb"),
    ],
)
def test_choices_are_checked_by_the_loader(override, message):
    """The choices are types of the schema: loading alone (no cross-field validation) rejects them."""
    with pytest.raises(ConfigError, match=message):
        load_schema(Config, None, [override])
    assert load_schema(Config, None, ["train.fast=true"]).train.fast is True
    assert load_schema(Config, None, ["train.fast=auto"]).train.fast == "auto"
