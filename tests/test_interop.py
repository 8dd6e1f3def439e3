"""Other people's models through this project's commands: open_clip models with random weights saved
in open_clip's layouts (a local-dir folder of a small ViT, an RN50 ``.pt``) and a checkpoint in
PMC-CLIP's layout; their embeddings through our loader equal their own, and retrieval, zero-shot,
embedding, search and fine-tuning run on them end to end. No network."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

import unimlip_fast
from unimlip_fast.interop import ClipEvalTransform, parse_spec
from unimlip_fast.provenance import state_digest

from .helpers import (
    CAPTIONS,
    SHARED_DATA,
    TINY_OVERRIDES,
    pmc_clip_checkpoint,
    pretrain_tiny,
    run_cli,
    write_chexpert,
    write_slake,
)

TEXTS = ["ct of the chest showing one small lesion", "Axial MRI, T2: two large lesions.", "normal", "a report " * 9]
SMALL_VIT = {  # a CLIP ViT and text transformer small enough for a test; open_clip's own tokenizer (BPE)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip", reason="open-clip-torch (with torchvision) is not installed")


@pytest.fixture(scope="module")
def vit_dir(open_clip, tmp_path_factory):
    """A local-dir folder: open_clip_config.json and open_clip_model.safetensors of a random small ViT."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vit")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_VIT, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")  # no weights there yet: random
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def rn50_pt(open_clip, tmp_path_factory):
    """open_clip's RN50 with random weights, saved as a torch file (as BiomedCLIP-style releases are)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("rn50") / "rn50_random.pt"
    torch.save(open_clip.create_model("RN50").state_dict(), path)
    return path


def their_model(open_clip, spec: str):
    name = spec.removeprefix("open_clip:")
    if name.startswith("local-dir:"):
        model, _, transform = open_clip.create_model_and_transforms(name)
    else:
        arch, weights = name.split(":", 1)
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=weights)
        name = arch
    return model.eval(), transform, open_clip.get_tokenizer(name)


@pytest.mark.parametrize("layout", ["local-dir ViT", pytest.param("RN50 .pt", marks=pytest.mark.slow)])
def test_open_clip_embeddings_equal_open_clips_own(layout, request, open_clip, image_folder):
    """(RN50 at 224 px: about 30 s on a busy 2-core machine, so marked slow; it runs in CI.)"""
    small = layout.startswith("local-dir")
    spec = (
        f"open_clip:local-dir:{request.getfixturevalue('vit_dir')}"
        if small
        else f"open_clip:RN50:{request.getfixturevalue('rn50_pt')}"
    )
    ours = unimlip_fast.load(spec, device="cpu")
    model, transform, tokenizer = their_model(open_clip, spec)
    paths = sorted(str(p) for p in image_folder.glob("scan*"))[: 6 if small else 2]
    from PIL import Image

    batch = torch.stack([transform(Image.open(p)) for p in paths])
    torch.testing.assert_close(torch.stack([ours.preprocess(p) for p in paths]), batch, atol=0, rtol=0)
    with torch.no_grad():
        their_img = model.encode_image(batch, normalize=True)
        their_txt = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(ours.encode_image(paths, batch_size=4 if small else 1), their_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.encode_text(TEXTS, batch_size=3), their_txt, atol=1e-5, rtol=0)
    assert ours.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert ours.describe() == {"spec": spec, "weights_sha256": state_digest(model.state_dict())}
    assert ours.embed_dim == their_img.shape[1]


def test_digest_follows_the_weights_not_the_file(vit_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    spec = f"open_clip:local-dir:{vit_dir}"
    digest = unimlip_fast.load(spec, device="cpu").describe()["weights_sha256"]
    state = load_file(str(vit_dir / "open_clip_model.safetensors"))
    assert digest == state_digest(state)
    state["logit_scale"] = state["logit_scale"] + 1e-3
    (tmp_path / "open_clip_config.json").write_text((vit_dir / "open_clip_config.json").read_text())
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    assert unimlip_fast.load(f"open_clip:local-dir:{tmp_path}", device="cpu").describe()["weights_sha256"] != digest


def test_clip_eval_transform_is_torchvisions(open_clip, image_folder):
    """PMC-CLIP's evaluation transform (Resize bicubic, CenterCrop, ToTensor, Normalize), written
    without torchvision, gives torchvision's tensors."""
    from PIL import Image

    theirs = open_clip.image_transform(64, is_train=False)
    ours = ClipEvalTransform(64)
    for path in sorted(image_folder.glob("scan*")):
        torch.testing.assert_close(ours(str(path)), theirs(Image.open(path)), atol=1e-6, rtol=0)


def test_specs_that_name_nothing_are_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="no PMC-CLIP checkpoint file"):
        parse_spec(f"pmc-clip:{tmp_path / 'missing.pt'}")
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json"):
        parse_spec(f"open_clip:local-dir:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        parse_spec(f"open_clip:RN50:{tmp_path / 'w.pt'}")
    with pytest.raises(ValueError, match="expected open_clip:hf-hub:ORG/NAME"):
        parse_spec("open_clip:hf-hub:just-a-name")
    assert (
        parse_spec("open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224").name
        == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    )
    assert run_cli(monkeypatch, "eval", "retrieval", "--checkpoint", "open_clip:RN50", "--data", "phantom:8") != 0
    err = capsys.readouterr().err
    assert "open_clip:MODEL_NAME:WEIGHTS" in " ".join(err.split()) and "Traceback" not in err


# --------------------------------------------------------------------------------- commands end to end


@pytest.fixture(scope="module")
def pairs_csv(image_folder, tmp_path_factory):
    """The six scans and the file that is not an image, one caption each, with a test split."""
    import shutil

    names = sorted(p.name for p in image_folder.glob("scan*")) + ["broken.png"]
    folder = tmp_path_factory.mktemp("pairs")
    for name in names:
        shutil.copy(image_folder / name, folder / name)
    rows = ["image,caption,part"] + [f'{n},"{c}",test' for n, c in zip(names, CAPTIONS)]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def label_csv(image_folder, tmp_path_factory):
    names = sorted(p.name for p in image_folder.glob("scan*"))
    rows = ["image,Effusion,Mass"] + [f"{image_folder / n},{i % 2},{int(i < 3)}" for i, n in enumerate(names)]
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def retrieval_on_pairs(monkeypatch, spec: str, pairs_csv, out) -> dict:
    """``eval retrieval`` of SPEC on the pairs' test split, which must succeed; its results JSON."""
    args = ["--data", f"csv:{pairs_csv}", "--split-key", "part", "--json", out, "--device", "cpu"]
    assert run_cli(monkeypatch, "eval", "retrieval", "--checkpoint", spec, *args) == 0
    return json.loads(out.read_text())


def test_retrieval_and_zeroshot_cli_on_open_clip(vit_dir, pairs_csv, label_csv, tmp_path, monkeypatch):
    spec = f"open_clip:local-dir:{vit_dir}"
    ours = unimlip_fast.load(spec, device="cpu")
    out = tmp_path / "r.json"
    results = retrieval_on_pairs(monkeypatch, spec, pairs_csv, out)
    assert results["n"] == 6 and results["skipped_records"] == {"undecodable_image": 1}  # the broken file's pair
    assert results["model"] == ours.describe()
    # the recalls are those of open_clip's own embeddings of the six readable pairs
    from PIL import Image

    from unimlip_fast.eval.retrieval import retrieval_metrics

    model, transform, tokenizer = their_model(pytest.importorskip("open_clip"), spec)
    scans = [pairs_csv.parent / line.split(",")[0] for line in pairs_csv.read_text().splitlines()[1:7]]
    with torch.no_grad():
        img = model.encode_image(torch.stack([transform(Image.open(p)) for p in scans]), normalize=True)
        txt = model.encode_text(tokenizer(CAPTIONS[:6]), normalize=True)
    expected = retrieval_metrics(img, txt, CAPTIONS[:6])
    assert (results["i2t"], results["t2i"]) == (expected["i2t"], expected["t2i"])

    zs = tmp_path / "zs.json"
    assert (
        run_cli(
            monkeypatch,
            "eval",
            "zeroshot",
            "--checkpoint",
            spec,
            "--data",
            f"csv:{label_csv}",
            "--json",
            zs,
            "--device",
            "cpu",
        )
        == 0
    )
    zero = json.loads(zs.read_text())
    assert zero["n_test"] == 6 and zero["model"] == ours.describe()
    assert zero["logit_scale"] == pytest.approx(ours.logit_scale)


def test_embed_and_search_with_an_open_clip_spec(vit_dir, pairs_csv, tmp_path, monkeypatch):
    spec = f"open_clip:local-dir:{vit_dir}"
    out = tmp_path / "index"
    assert (
        run_cli(
            monkeypatch,
            "embed",
            "--checkpoint",
            spec,
            "--data",
            f"csv:{pairs_csv}",
            "--split",
            "all",
            "--output",
            out,
            "--workers",
            0,
            "--device",
            "cpu",
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    ours = unimlip_fast.load(spec, device="cpu")
    assert index["checkpoint"] == spec and index["weights_sha256"] == ours.describe()["weights_sha256"]
    assert index["n_images"] == 6 and index["embed_dim"] == 32
    import numpy as np

    rows = np.load(out / "part-00000.text.npy")
    torch.testing.assert_close(torch.from_numpy(rows), ours.encode_text(CAPTIONS[:7]), atol=1e-5, rtol=0)
    hits = tmp_path / "hits.json"
    assert (
        run_cli(
            monkeypatch, "search", "--index", out, "--text", CAPTIONS[2], "-k", 3, "--json", hits, "--device", "cpu"
        )
        == 0
    )  # the model from the index's spec
    assert len(json.loads(hits.read_text())) == 3


def test_finetune_classify_on_open_clip_image_tower(vit_dir, tmp_path, monkeypatch, capsys):
    release = write_chexpert(tmp_path / "data")
    spec, js = f"open_clip:local-dir:{vit_dir}", tmp_path / "r.json"
    common = [
        "--data",
        f"chexpert:{release}",
        "--fraction",
        "1.0",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.epochs=1",
        "data.val_fraction=0.25",
    ]
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "classify",
            "--checkpoint",
            spec,
            *common,
            "--run-dir",
            tmp_path / "ft",
            "--json",
            js,
            "data.image_size=64",
        )
        == 0
    )
    results = json.loads(js.read_text())
    assert results["checkpoint"] == spec and results["model"] == unimlip_fast.load(spec, device="cpu").describe()
    assert 0 <= results["macro_auc"] <= 1
    from safetensors.torch import load_file

    assert any(k.startswith("visual.transformer.") for k in load_file(str(tmp_path / "ft" / "best.safetensors")))
    # a ViT is fine-tuned at its own size: another one is one line
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "classify",
            "--checkpoint",
            spec,
            *common,
            "--run-dir",
            tmp_path / "x",
            "data.image_size=96",
        )
        != 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "takes 64 px images; set data.image_size=64" in err and "Traceback" not in err


def test_random_init_draws_the_architecture_afresh_from_the_seed(vit_dir, pmc_clip):
    from unimlip_fast.finetune.common import load_backbone

    for spec in (f"open_clip:local-dir:{vit_dir}", pmc_clip[0]):
        pretrained = load_backbone(spec, "pretrained", 0, torch.device("cpu")).model.state_dict()
        a = load_backbone(spec, "random", 1, torch.device("cpu")).model.state_dict()
        b = load_backbone(spec, "random", 1, torch.device("cpu")).model.state_dict()
        assert set(a) == set(pretrained)
        assert all(torch.equal(a[k], b[k]) for k in a)
        weights = [k for k, v in a.items() if v.is_floating_point() and v.numel() > 1 and v.std() > 0]
        assert weights and not any(torch.equal(a[k], pretrained[k]) for k in weights if "visual" in k)


def test_finetune_vqa_refuses_open_clip_in_one_line(vit_dir, tmp_path, monkeypatch, capsys):
    root = write_slake(tmp_path / "slake")
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "vqa",
            "--checkpoint",
            f"open_clip:local-dir:{vit_dir}",
            "--data",
            f"slake:{root}",
            "--run-dir",
            tmp_path / "v",
        )
        != 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "VQA fine-tuning needs Uni-Mlip's image trunk" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- PMC-CLIP


@pytest.fixture(scope="module")
def pmc_clip(tmp_path_factory):
    """A checkpoint in PMC-CLIP's layout (tiny shapes), its text tower's folder, and the model it came from."""
    from unimlip_fast.config import load_config
    from unimlip_fast.model import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("pmc_clip")
    cfg = load_config(None, [*TINY_OVERRIDES, "model.text.context_length=77"])  # positions for PMC-CLIP's 77
    tokenizer = build_tokenizer(cfg.model.text, CAPTIONS)
    torch.manual_seed(3)
    source = build_model(cfg.model, cfg.loss, tokenizer).eval()
    state = pmc_clip_checkpoint(
        source, len(tokenizer), cfg.model.text.hidden_size, cfg.model.embed_dim, cfg.model.fusion_layers
    )
    torch.save({"state_dict": state, "epoch": 100}, root / "checkpoint.pt")
    text = root / "pubmedbert"
    tokenizer.save_pretrained(str(text))
    source.text.encoder.config.save_pretrained(str(text))
    return f"pmc-clip:{root / 'checkpoint.pt'}:{text}", source, tokenizer, state


def test_pmc_clip_spec_embeds_as_the_checkpoint_does(pmc_clip, image_folder):
    spec, source, tokenizer, state = pmc_clip
    ours = unimlip_fast.load(spec, device="cpu")
    assert ours.image_size == 64 and ours.embed_dim == 32 and ours.context_length == 77
    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    batch = torch.stack([ClipEvalTransform(64)(p) for p in paths])
    with torch.no_grad():
        expected_img = F.normalize(source.visual(batch), dim=-1)
        tok = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        states = source.text.encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        expected_txt = F.normalize(states.last_hidden_state[:, 0] @ state["module.text_projection"], dim=-1)
    torch.testing.assert_close(ours.encode_image(paths), expected_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.encode_text(TEXTS), expected_txt, atol=1e-5, rtol=0)
    assert ours.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert torch.equal(ours.model.fusion.head.weight, state["module.mlm_projection"].T)  # the MLM head too (VQA)


def test_pmc_clip_spec_through_retrieval_and_init_from(pmc_clip, pairs_csv, tmp_path, monkeypatch):
    from unimlip_fast.config import load_config
    from unimlip_fast.loading import load_init_from
    from unimlip_fast.model import build_model

    spec, source, tokenizer, _ = pmc_clip
    out = tmp_path / "r.json"
    results = retrieval_on_pairs(monkeypatch, spec, pairs_csv, out)
    assert results["n"] == 6 and results["model"]["spec"] == spec
    cfg = load_config(None, [*TINY_OVERRIDES, "model.text.context_length=77"])
    target = build_model(cfg.model, cfg.loss, tokenizer)
    report = load_init_from(target, spec.rsplit(":", 1)[0])  # model.init_from=pmc-clip:PATH
    assert not [k for k in report.missing if k.startswith(("visual.", "text.", "fusion."))]
    torch.testing.assert_close(target.visual.attnpool.c_proj.weight, source.visual.attnpool.c_proj.weight)


def test_pmc_clip_spec_fine_tunes_vqa(pmc_clip, tmp_path, monkeypatch):
    """PMC-CLIP is a Uni-Mlip model: VQA fine-tuning takes its image trunk and BERT tower."""
    spec = pmc_clip[0]
    root = write_slake(tmp_path / "slake")
    js = tmp_path / "v.json"
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "vqa",
            "--checkpoint",
            spec,
            "--data",
            f"slake:{root}",
            "--run-dir",
            tmp_path / "v",
            "--json",
            js,
            "data.image_size=64",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=1",
            "model.learnable_tokens=4",
            "train.freeze_text=true",
        )
        == 0
    )
    results = json.loads(js.read_text())
    assert results["n_test"] == 9 and results["model"]["spec"] == spec
    assert results["model"]["weights_sha256"] == unimlip_fast.load(spec, device="cpu").describe()["weights_sha256"]


def test_init_from_open_clip_export_loads_every_tower(tiny_run, tmp_path, monkeypatch):
    from unimlip_fast.config import load_config
    from unimlip_fast.loading import load_init_from, tokenizer_of
    from unimlip_fast.model import build_model

    folder = tmp_path / "export"
    assert run_cli(monkeypatch, "export", "--checkpoint", tiny_run, "--output", folder) == 0
    trained = unimlip_fast.load(tiny_run, device="cpu")
    cfg = load_config(None, TINY_OVERRIDES)
    torch.manual_seed(5)
    target = build_model(cfg.model, cfg.loss, trained.tokenizer)
    report = load_init_from(target, str(folder))
    assert report.mismatched == [] and report.unexpected == []
    assert all(k.startswith(("fusion.", "simclr_head.")) for k in report.missing), report.missing
    for name, tensor in trained.model.state_dict().items():
        if not name.startswith(("fusion.", "simclr_head.")):
            torch.testing.assert_close(target.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert tokenizer_of(str(folder)) == folder and tokenizer_of(f"open_clip:local-dir:{folder}") == folder
    pytest.importorskip("open_clip", reason="open-clip-torch (with torchvision) is not installed")
    again = build_model(cfg.model, cfg.loss, trained.tokenizer)
    through_open_clip = load_init_from(again, f"open_clip:local-dir:{folder}")  # model.init_from=open_clip:...
    assert through_open_clip.loaded == report.loaded and through_open_clip.unexpected == []
    for name, tensor in target.state_dict().items():
        if not name.startswith(("fusion.", "simclr_head.")):
            torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_open_clip_on_medpix_and_nih1000(vit_dir, tmp_path, monkeypatch):
    medpix, nih = SHARED_DATA / "medpix2", SHARED_DATA / "nih1000"
    if not (medpix.is_dir() and nih.is_dir()):
        pytest.skip(f"real MedPix / NIH data not found under {SHARED_DATA}")
    spec = f"open_clip:local-dir:{vit_dir}"
    out, zs = tmp_path / "r.json", tmp_path / "zs.json"
    assert (
        run_cli(
            monkeypatch,
            "eval",
            "retrieval",
            "--checkpoint",
            spec,
            "--data",
            f"medpix:{medpix}",
            "--split",
            "test",
            "--json",
            out,
            "--device",
            "cpu",
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert results["n"] > 100 and results["n_duplicates_dropped"] > 0
    assert 0 <= results["i2t"]["R@10"] <= 100 and results["model"]["spec"] == spec
    assert (
        run_cli(
            monkeypatch,
            "eval",
            "zeroshot",
            "--checkpoint",
            spec,
            "--data",
            f"nih:{nih}",
            "--split",
            "test",
            "--json",
            zs,
            "--device",
            "cpu",
        )
        == 0
    )
    zero = json.loads(zs.read_text())
    assert zero["n_test"] == 200 and 0 <= zero["macro_auc"] <= 1


# ------------------------------------------------------------------------- hf-hub, from the hub's cache

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache, repo_id: str, files: dict) -> None:
    """``files`` (name -> source path) as the Hugging Face hub cache holds a downloaded repo:
    ``models--ORG--NAME/snapshots/<commit>/`` and ``refs/main`` naming the commit."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


@pytest.fixture(scope="module")
def hub_cache(vit_dir, tmp_path_factory):
    """A hub cache holding the small ViT three ways: its weights as safetensors, as a torch .bin, none."""
    from safetensors.torch import load_file

    cache = tmp_path_factory.mktemp("hub")
    config, weights = vit_dir / "open_clip_config.json", vit_dir / "open_clip_model.safetensors"
    put_in_hub_cache(
        cache, "test-org/small-vit", {"open_clip_config.json": config, "open_clip_model.safetensors": weights}
    )
    torch.save(load_file(str(weights)), cache / "vit.bin")
    put_in_hub_cache(
        cache,
        "test-org/small-vit-bin",
        {"open_clip_config.json": config, "open_clip_pytorch_model.bin": cache / "vit.bin"},
    )
    put_in_hub_cache(cache, "test-org/no-weights", {"open_clip_config.json": config})
    return cache


def go_offline(monkeypatch, cache) -> None:
    """No network, and ``cache`` as the hub cache. huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE
    once, at import, into its constants (which it and transformers consult at call time): the
    environment is set for any process started from here, the constants for this one."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    go_offline(monkeypatch, hub_cache)
    return hub_cache


@pytest.mark.parametrize("repo", ["test-org/small-vit", "test-org/small-vit-bin"])
def test_hf_hub_spec_loads_offline_from_the_cache(repo, offline_hub, open_clip, vit_dir, image_folder):
    from PIL import Image
    from safetensors.torch import load_file

    spec = f"open_clip:hf-hub:{repo}"
    ours = unimlip_fast.load(spec, device="cpu")
    model, transform, tokenizer = their_model(open_clip, f"open_clip:local-dir:{vit_dir}")
    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    with torch.no_grad():
        their_img = model.encode_image(torch.stack([transform(Image.open(p)) for p in paths]), normalize=True)
        their_txt = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(ours.encode_image(paths, batch_size=4), their_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.encode_text(TEXTS), their_txt, atol=1e-5, rtol=0)
    digest = state_digest(load_file(str(vit_dir / "open_clip_model.safetensors")))
    assert ours.describe() == {"spec": spec, "weights_sha256": digest}


def test_hf_hub_spec_without_weights_is_one_line_not_a_random_model(offline_hub, tmp_path, monkeypatch, capsys):
    spec = "open_clip:hf-hub:test-org/no-weights"
    with pytest.raises(RuntimeError, match="no weights"):
        unimlip_fast.load(spec, device="cpu")
    assert (
        run_cli(monkeypatch, "eval", "retrieval", "--checkpoint", spec, "--data", "phantom:8", "--device", "cpu") != 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert f"{spec}: no weights" in err and "Traceback" not in err


def test_embed_and_retrieval_cli_with_an_hf_hub_spec(offline_hub, open_clip, vit_dir, pairs_csv, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    spec = "open_clip:hf-hub:test-org/small-vit"
    out = tmp_path / "index"
    assert (
        run_cli(
            monkeypatch,
            "embed",
            "--checkpoint",
            spec,
            "--data",
            f"csv:{pairs_csv}",
            "--split",
            "all",
            "--output",
            out,
            "--workers",
            0,
            "--device",
            "cpu",
        )
        == 0
    )
    from safetensors.torch import load_file

    digest = state_digest(load_file(str(vit_dir / "open_clip_model.safetensors")))
    index = json.loads((out / "index.json").read_text())
    assert index["checkpoint"] == spec and index["weights_sha256"] == digest and index["n_images"] == 6
    model, transform, tokenizer = their_model(open_clip, f"open_clip:local-dir:{vit_dir}")
    keys = json.loads((out / "part-00000.keys.json").read_text())
    with torch.no_grad():
        their_img = model.encode_image(
            torch.stack([transform(Image.open(pairs_csv.parent / k)) for k in keys["image_keys"]]), normalize=True
        )
        their_txt = model.encode_text(tokenizer(keys["captions"]), normalize=True)
    torch.testing.assert_close(torch.from_numpy(np.load(out / "part-00000.image.npy")), their_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(np.load(out / "part-00000.text.npy")), their_txt, atol=1e-5, rtol=0)

    results_json = tmp_path / "r.json"
    results = retrieval_on_pairs(monkeypatch, spec, pairs_csv, results_json)
    assert results["n"] == 6 and results["model"] == {"spec": spec, "weights_sha256": digest}


# ------------------------------------------------------------------- model.init_from=open_clip:... in a run


def pretrain_from(monkeypatch, run_dir, init_from: str) -> int:
    return pretrain_tiny(monkeypatch, run_dir, "train.max_steps=1", "eval.split=", f"model.init_from={init_from}")


@pytest.mark.parametrize("layout", ["local-dir", "hf-hub"])
def test_pretraining_starts_from_an_open_clip_model_of_its_architecture(
    layout, open_clip, tiny_run, tmp_path, monkeypatch
):
    """A run of the tiny recipe, exported (and, for hf-hub, uploaded with --hub-id: here, put in the hub's
    cache, offline), is an open_clip model of the recipe's shape: a run started from it holds its every
    tensor at step 0 (under our names), says how many it loaded, and takes its tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from unimlip_fast.export import from_open_clip_name
    from unimlip_fast.train import engine

    folder, repo = tmp_path / "export", "test-org/tiny-unimlip"
    hub_id = ["--hub-id", repo] if layout == "hf-hub" else []
    assert run_cli(monkeypatch, "export", "--checkpoint", tiny_run, "--output", folder, *hub_id) == 0
    spec = f"open_clip:local-dir:{folder}"
    if layout == "hf-hub":
        put_in_hub_cache(tmp_path / "hub", repo, {p.name: p for p in folder.iterdir()})
        go_offline(monkeypatch, tmp_path / "hub")
        spec = f"open_clip:hf-hub:{repo}"
    at_start = {}

    def load_and_keep(model, init_from):
        report = engine_load_init_from(model, init_from)
        at_start.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return report

    engine_load_init_from = engine.load_init_from
    monkeypatch.setattr(engine, "load_init_from", load_and_keep)
    run = tmp_path / "run"
    assert pretrain_from(monkeypatch, run, spec) == 0
    theirs = load_file(str(folder / "open_clip_model.safetensors"))
    assert len(theirs) > 100
    for name, tensor in theirs.items():
        ours = at_start[from_open_clip_name(name)]
        torch.testing.assert_close(ours, tensor.reshape(ours.shape), atol=0, rtol=0, msg=name)
    notes = [json.loads(line).get("note", "") for line in (run / "notes.jsonl").read_text().splitlines()]
    said = [note for note in notes if note.startswith(f"init from {spec}:")]
    assert said and f"loaded {len(theirs)} tensors;" in said[0] and "unexpected 0; shape-mismatched 0" in said[0]
    # its token ids mean what the weights learnt: the source's vocabulary, not one built from this run's captions
    assert (
        AutoTokenizer.from_pretrained(str(run / "tokenizer")).get_vocab()
        == unimlip_fast.load(tiny_run, device="cpu").tokenizer.get_vocab()
    )
    assert (run / "model.safetensors").is_file()


def test_pretraining_from_an_open_clip_model_of_another_architecture_is_one_line(
    vit_dir, tmp_path, monkeypatch, capsys
):
    spec = f"open_clip:local-dir:{vit_dir}"  # a ViT, into the recipe's ResNet
    assert pretrain_from(monkeypatch, tmp_path / "run", spec) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"model.init_from={spec}: its architecture is not this recipe's (image tower and text tower differ)" in err
    assert re.search(r"its weights fill 0 of the recipe's \d+ image-tower tensors and 0 of the recipe's \d+ text-", err)
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
