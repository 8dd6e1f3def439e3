"""Zero-shot classification: prompt ensembles, positive-vs-negative scores, the fine-tuning JSON shape."""

import json

import numpy as np
import pytest
import torch

import unimlip_fast
from unimlip_fast.data.labelled import NIH_LABELS, read_label_csv
from unimlip_fast.data.records import DataError
from unimlip_fast.eval.zeroshot import (
    chance_macro_auc,
    default_prompts,
    evaluate_zeroshot,
    prompt_ensembles,
    read_prompts,
    zeroshot_scores,
)

from .helpers import SHARED_DATA, run_cli


@pytest.fixture(scope="module")
def label_csv(image_folder, tmp_path_factory):
    """The six scans and the broken file with two labels; one blank (unknown) value."""
    names = sorted(p.name for p in image_folder.glob("scan*")) + ["broken.png"]
    rows = ["image,Effusion,Mass"] + [f"{image_folder / n},{i % 2},{int(i < 3)}" for i, n in enumerate(names)]
    rows[2] = rows[2].rsplit(",", 1)[0] + ","  # scan1: Mass unknown
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_scores_prefer_the_positive_ensemble():
    positive = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    negative = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), dim=-1)
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.2], [0.0, 0.0, 1.0], [0.1, 1.0, 0.0]]), dim=-1)
    scores = zeroshot_scores(images, positive, negative, logit_scale=10.0)
    assert scores.shape == (3, 2)
    assert scores[0, 0] > 0.9 and scores[1, 0] < 0.1 and scores[2, 1] > 0.9
    expected = torch.sigmoid(10.0 * (images @ positive.T - images @ negative.T))  # two-way softmax
    torch.testing.assert_close(scores, expected)


def test_prompt_ensembles_average_normalised_prompt_embeddings(tiny_run):
    model = unimlip_fast.load(tiny_run, device="cpu")
    prompts = default_prompts(("Effusion", "No Finding"))
    assert prompts["Effusion"]["positive"][1] == "chest x-ray showing pleural effusion"
    assert prompts["Effusion"]["negative"][0] == "no pleural effusion"
    positive, negative = prompt_ensembles(model, prompts, ("Effusion", "No Finding"))
    expected = torch.nn.functional.normalize(model.encode_text(prompts["No Finding"]["negative"]).mean(0), dim=-1)
    torch.testing.assert_close(negative[1], expected)
    torch.testing.assert_close(positive.norm(dim=-1), torch.ones(2))


def test_zeroshot_cli_on_a_label_csv(tiny_run, label_csv, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "templates": {"positive": ["{} is present"], "negative": ["{} is absent"]},
                "labels": {"Mass": {"positive": ["a mass"], "negative": ["no mass"]}},
            }
        )
    )
    out = tmp_path / "zs.json"
    assert (
        run_cli(
            monkeypatch,
            "eval",
            "zeroshot",
            "--checkpoint",
            tiny_run,
            "--data",
            f"csv:{label_csv}",
            "--prompts",
            prompts,
            "--json",
            out,
            "--device",
            "cpu",
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert set(results) >= {"macro_auc", "per_label", "n_test", "excluded_labels", "chance_macro_auc_p95"}
    assert results["n_test"] == 6 and results["skipped"] == {"undecodable_image": 1}
    assert set(results["per_label"]) == {"Effusion", "Mass"} and results["n_positive"] == {"Effusion": 3, "Mass": 2}
    assert results["prompts"]["Effusion"] == {
        "positive": ["pleural effusion is present"],
        "negative": ["pleural effusion is absent"],
    }
    assert results["prompts"]["Mass"]["positive"] == ["a mass"]
    assert results["macro_auc"] == pytest.approx(np.mean(list(results["per_label"].values())))
    assert all(0.0 <= v <= 1.0 for v in results["per_label"].values())


def test_zeroshot_auc_is_one_when_the_prompts_name_what_the_images_show(tiny_run, image_folder, tmp_path):
    """The label is "matches a reference image": with the reference image's own embedding as the
    positive ensemble, every image equal to it ranks first."""
    model = unimlip_fast.load(tiny_run, device="cpu")
    scans = sorted(image_folder.glob("scan*"))
    rows = ["image,Same"] + [f"{scans[i % 2]},{int(i % 2 == 0)}" for i in range(8)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    data = read_label_csv(tmp_path / "l.csv")
    reference = model.encode_image([str(scans[0])])
    other = model.encode_image([str(scans[1])])
    scores = zeroshot_scores(model.encode_image([it.path for it in data.items]), reference, other, 50.0)
    from unimlip_fast.eval.metrics import macro_auc

    assert macro_auc(scores.numpy(), np.array([it.target for it in data.items]), data.labels)["macro_auc"] == 1.0


def test_chance_reference():
    targets = np.zeros((200, 3))
    targets[:10, 0] = targets[:50, 1] = targets[:100, 2] = 1
    chance = chance_macro_auc(targets, ("a", "b", "c"), n_draws=200)
    assert 0.47 < chance["mean"] < 0.53 and 0.38 < chance["p05"] < 0.48 and 0.52 < chance["p95"] < 0.62


def test_bad_prompts_and_data_are_one_line(tiny_run, label_csv, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"labels": {"Hernia": {"positive": ["x"], "negative": ["y"]}}}))
    with pytest.raises(DataError, match="not in the data set's labels"):
        read_prompts(bad, ("Effusion", "Mass"))
    assert run_cli(monkeypatch, "eval", "zeroshot", "--checkpoint", tiny_run, "--data", "xray:/nowhere") != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "FORMAT one of nih, chexpert, mimic, csv" in err and "Traceback" not in err


def test_nih1000_test_split_reads_with_every_label(tiny_run):
    root = SHARED_DATA / "nih1000"
    if not root.is_dir():
        pytest.skip(f"NIH1000 not found at {root} (../shared/data beside the repo, or $UNIMLIP_SHARED_DATA)")
    from unimlip_fast.data.sources import read_labelled

    data = read_labelled("nih", str(root), "test")
    assert len(data) == 200 and data.labels == NIH_LABELS
    model = unimlip_fast.load(tiny_run, device="cpu")
    small = type(data)(data.items[:40], data.skipped, data.source, data.labels)
    results = evaluate_zeroshot(model, small, chance_draws=20)
    assert results["n_test"] == 40 and set(results["per_label"]) | set(results["excluded_labels"]) == set(NIH_LABELS)
