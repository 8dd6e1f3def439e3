"""unimlip_fast.load: the same embeddings as retrieval's evaluation, the README example, bad runs."""

import os
import re
import shutil

import pytest
import torch
from PIL import Image

import unimlip_fast
from unimlip_fast.data import Record, build_dataset, build_eval_loader
from unimlip_fast.eval.retrieval import embed_pairs

from .helpers import REPO


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return unimlip_fast.load(tiny_run, device="cpu")


def test_preprocess_is_the_eval_loaders_transform(loaded, image_folder):
    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    records = [Record(key=str(i), caption=f"caption {i}", image=p) for i, p in enumerate(paths)]
    dataset = build_dataset(records, loaded.tokenizer, loaded.image_size, loaded.context_length)
    batch = next(iter(build_eval_loader(dataset, len(records))))
    ours = torch.stack([loaded.preprocess(p) for p in paths])
    assert ours.shape == (len(paths), 3, loaded.image_size, loaded.image_size)
    assert torch.equal(ours, batch["image"])
    png = next(p for p in paths if p.endswith(".png"))
    with Image.open(png) as im:
        assert torch.equal(loaded.preprocess(im), loaded.preprocess(png))


def test_embeddings_equal_retrieval_evaluation(loaded, image_folder):
    paths = sorted(str(p) for p in image_folder.glob("scan*"))
    captions = [f"ct of the chest showing {n} lesions" for n in ("one", "two", "three", "four", "five", "six")]
    records = [Record(key=str(i), caption=c, image=p) for i, (c, p) in enumerate(zip(captions, paths))]
    dataset = build_dataset(records, loaded.tokenizer, loaded.image_size, loaded.context_length)
    ref_img, ref_txt = embed_pairs(loaded.model, dataset, torch.device("cpu"), batch_size=4)

    img = loaded.encode_image(paths, batch_size=4)
    txt = loaded.encode_text(captions, batch_size=4)
    assert img.shape == (6, loaded.embed_dim) and img.dtype == torch.float32
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(6))
    # any batching, and a tensor batch or single items, give the same rows
    torch.testing.assert_close(loaded.encode_image(paths, batch_size=64), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.encode_text(captions, batch_size=1), txt, atol=1e-5, rtol=0)
    batch = torch.stack([loaded.preprocess(p) for p in paths])
    torch.testing.assert_close(loaded.encode_image(batch, batch_size=5), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.encode_image(paths[2])[0], img[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.encode_text(captions[3])[0], txt[3], atol=1e-5, rtol=0)
    assert loaded.encode_text([]).shape == (0, loaded.embed_dim)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use a trained model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tiny_run, image_folder, tmp_path, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    shutil.copytree(tiny_run, tmp_path / "runs" / "medpix_cpu")
    for name in ("scan1.png", "scan2.png"):
        shutil.copy(image_folder / name, tmp_path / name)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.strip()


def test_unfinished_run_is_one_clear_error(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        unimlip_fast.load(run, device="cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        unimlip_fast.load(tmp_path / "nothing", device="cpu")
