"""Fine-tuning's pieces: the pretrained run loaded (or drawn afresh), the attention pool resized,
batches over ranks, the VQA model's shapes and parameter groups."""

import pytest
import torch
from safetensors.torch import load_file

from unimlip_fast.data.questions import QAItem
from unimlip_fast.finetune.common import epoch_batches, load_pretrained_run, resize_attention_pool
from unimlip_fast.finetune.vqa import VQAModel, answer_vocabulary, majority_baseline
from unimlip_fast.model.visual import ModifiedResNet

from .helpers import finetuning_base_run


def test_pretrained_and_random_initialisation(tmp_path):
    run = finetuning_base_run(tmp_path / "run")
    saved = load_file(str(run / "model.safetensors"))
    model, tokenizer, cfg = load_pretrained_run(run, "pretrained", 0, torch.device("cpu"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    random_a, _, _ = load_pretrained_run(run, "random", 1, torch.device("cpu"))
    random_b, _, _ = load_pretrained_run(run, "random", 1, torch.device("cpu"))
    key = "visual.conv1.weight"
    assert not torch.equal(random_a.state_dict()[key], saved[key])
    assert torch.equal(random_a.state_dict()[key], random_b.state_dict()[key])  # seeded
    assert all(p.requires_grad for p in model.parameters())


def test_attention_pool_resized_to_another_input_size():
    visual = ModifiedResNet([1, 1, 1, 1], 16, image_size=64, width=8).eval()
    before = visual.attnpool.positional_embedding.detach().clone()
    resize_attention_pool(visual, 64)
    assert torch.equal(visual.attnpool.positional_embedding, before)  # same grid: untouched
    resize_attention_pool(visual, 96)
    pos = visual.attnpool.positional_embedding
    assert pos.shape == (3 * 3 + 1, before.shape[1]) and torch.equal(pos[0], before[0])
    assert visual(torch.randn(2, 3, 96, 96)).shape == (2, 16)


@pytest.mark.parametrize("n,batch,world", [(23, 8, 1), (23, 8, 2), (5, 150, 1), (17, 6, 3)])
def test_epoch_batches_cover_each_sample_once_across_ranks(n, batch, world):
    per_rank = [epoch_batches(n, batch, r, world, seed=0, epoch=1) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank steps the same number of times
    seen = [i for rank in per_rank for b in rank for i in b]
    assert len(seen) == len(set(seen)) and n - len(seen) < 2 * world
    assert all(len(b) >= 2 for rank in per_rank for b in rank)
    assert epoch_batches(n, batch, 0, world, 0, 1) == per_rank[0] != epoch_batches(n, batch, 0, world, 0, 2)


def test_vqa_model_shapes_and_gradients(tmp_path):
    run = finetuning_base_run(tmp_path / "run")
    backbone, tokenizer, cfg = load_pretrained_run(run, "pretrained", 0, torch.device("cpu"))
    model = VQAModel(backbone, n_answers=7, image_size=32, learnable_tokens=5)
    tok = tokenizer(["is there a lesion", "which side"], padding=True, return_tensors="pt")
    logits = model(torch.randn(2, 3, 32, 32), tok["input_ids"], tok["attention_mask"])
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert model.learnable.grad is not None and model.visual.conv1.weight.grad is not None
    encoder = {id(p) for p in model.encoder_parameters()}
    assert id(model.learnable) not in encoder and id(model.text.encoder.embeddings.word_embeddings.weight) in encoder


def test_majority_baseline_and_vocabulary():
    q = lambda a, t: QAItem("x.jpg", "q?", a, t)
    train = [
        q("yes", "CLOSED"),
        q("no", "CLOSED"),
        q("no", "CLOSED"),
        q("left", "OPEN"),
        q("liver", "OPEN"),
        q("liver", "OPEN"),
    ]
    test = [q("no", "CLOSED"), q("yes", "CLOSED"), q("liver", "OPEN"), q("spleen", "OPEN")]
    out = majority_baseline(train, test)
    assert out["majority_answers"] == {"CLOSED": "no", "OPEN": "liver"}
    assert (out["closed"], out["open"], out["overall"], out["n_unseen_answers"]) == (0.5, 0.5, 0.5, 1)
    assert answer_vocabulary(train) == ["liver", "no", "left", "yes"]


@pytest.mark.parametrize("recipe", ["classify", "classify_cpu", "vqa", "vqa_cpu"])
def test_shipped_finetune_recipes_load(recipe):
    from unimlip_fast.finetune.config import load_classify_config, load_vqa_config

    from .helpers import REPO

    load = load_classify_config if recipe.startswith("classify") else load_vqa_config
    cfg = load(REPO / "configs" / "finetune" / f"{recipe}.yaml", ["data.path=somewhere"])
    assert cfg.train.init == "pretrained" and cfg.data.image_size % 32 == 0


def test_precomputed_question_states_and_feature_maps_match_the_live_towers(tmp_path):
    from unimlip_fast.finetune.vqa import question_states

    run = finetuning_base_run(tmp_path / "run")
    backbone, tokenizer, _ = load_pretrained_run(run, "pretrained", 0, torch.device("cpu"))
    model = VQAModel(backbone, n_answers=3, image_size=32, learnable_tokens=2).eval()
    tok = tokenizer(
        ["is there a lesion", "which side is it on"], padding="max_length", max_length=24, return_tensors="pt"
    )
    states = question_states(model.text, tok["input_ids"], tok["attention_mask"], torch.device("cpu"), batch_size=1)
    image = torch.randn(2, 3, 32, 32)
    live = model(image, tok["input_ids"], tok["attention_mask"])
    cached = model(image, tok["input_ids"], tok["attention_mask"], states)
    torch.testing.assert_close(cached, live)
    both = model(image, tok["input_ids"], tok["attention_mask"], states, model.visual.trunk(image))
    torch.testing.assert_close(both, live)
