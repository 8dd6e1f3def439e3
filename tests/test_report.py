"""The run report of a tiny pretraining run: every figure a real image embedded in one offline page,
the gallery's marked matches checked against the data, overlays, and runs that recorded less."""

import base64
import html
import io
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from .helpers import REPO, TINY_OVERRIDES, run_cli

FIGURES = ("losses", "throughput", "retrieval", "gallery_i2t", "gallery_t2i")
PHANTOM_SIZE = 96
TINY_RUN = TINY_OVERRIDES + [
    "data.format=phantom",
    f"data.phantom_size={PHANTOM_SIZE}",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.simclr_start=3",
    "train.lr=1e-3",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Six steps, SimCLR from step 3, retrieval on the phantom test split every 3 steps and at the end."""
    run = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        code = run_cli(
            monkeypatch,
            "pretrain",
            REPO / "configs/demo.yaml",
            "--ds-config",
            REPO / "configs/zero2.json",
            "--run-dir",
            run,
            *TINY_RUN,
            "train.max_steps=6",
            "eval.split=test",
            "eval.every=3",
        )
    assert code == 0
    return run


def test_pretrain_writes_a_self_contained_report_with_every_figure(demo_run):
    page = (demo_run / "report.html").read_text()
    for name in FIGURES:
        png = demo_run / f"report_{name}.png"
        image = np.asarray(Image.open(png).convert("L"))
        assert min(image.shape) > 200 and image.std() > 5, name  # drawn, not blank
        embedded = base64.b64encode(png.read_bytes()).decode()
        assert f'data-file="{png.name}" src="data:image/png;base64,{embedded}"' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # opens from disk, offline
    embedded = page.split("base64,")[1].split('"')[0]
    assert Image.open(io.BytesIO(base64.b64decode(embedded))).size[0] > 200


def test_report_states_the_run_facts(demo_run):
    entries = [json.loads(line) for line in (demo_run / "notes.jsonl").read_text().splitlines()]
    facts = next(e["facts"] for e in entries if "facts" in e)
    assert facts["precision"] == "fp32" and facts["zero_stage"] == 2 and facts["simclr_step"] == 3
    assert facts["world_size"] == 1 and facts["total_steps"] == 6
    said = {
        topic: next(
            e["note"].removeprefix(f"{topic}:").strip() for e in entries if e.get("note", "").startswith(f"{topic}:")
        )
        for topic in ("kernels", "data")
    }
    assert "model.kernels=reference" in said["kernels"] and "cpu" in said["data"]  # what was chosen, and why
    page = (demo_run / "report.html").read_text()
    for name, value in (
        ("commit", facts["commit"]),
        ("kernels (chosen, why)", said["kernels"]),
        ("data backend (chosen, why)", said["data"]),
        ("precision", "fp32"),
        ("ZeRO stage", "2"),
        ("non-finite steps (skipped)", "0"),
        ("records skipped while reading", "none"),
    ):
        assert f"<td>{name}</td><td>{html.escape(value)}" in page, name
    final = json.loads((demo_run / "summary.json").read_text())["retrieval"]
    assert f"<td>{final['i2t']['R@10']:g}</td>" in page


def test_gallery_marks_the_true_matches(demo_run):
    from unimlip_fast.config import DataConfig
    from unimlip_fast.data.sources import read_records
    from unimlip_fast.report.gallery import build_gallery

    data = {
        r.key: " ".join(r.caption.split())
        for r in read_records(DataConfig(format="phantom", phantom_size=PHANTOM_SIZE), "test").items
    }
    (gallery,) = json.loads((demo_run / "report_gallery.json").read_text())
    assert len(gallery["image_queries"]) == 8 and len(gallery["caption_queries"]) == 4
    for query in gallery["image_queries"] + gallery["caption_queries"]:
        assert len(query["top"]) == 5 and " ".join(query["caption"].split()) == data[query["key"]]
        for hit in query["top"]:
            assert hit["true"] == (data[hit["key"]] == data[query["key"]])
        assert query["best_true"]["true"] and query["best_true"]["key"] == query["key"]  # duplicates are dropped
    # Ranked against the whole split every query has its one true match marked (duplicate captions are
    # dropped), at the position its rank says, and it is the query's own pair.
    whole = build_gallery(demo_run, top_k=PHANTOM_SIZE)
    for query in whole.image_queries + whole.caption_queries:
        (marked,) = [n for n, hit in enumerate(query["top"]) if hit["true"]]
        assert query["top"][marked]["key"] == query["key"]
        assert marked + 1 == query["rank"]


def test_report_overlays_runs(demo_run, tmp_path, monkeypatch):
    from unimlip_fast.report.figures import loss_figure, loss_terms
    from unimlip_fast.report.runs import read_runs

    other = tmp_path / "other"
    shutil.copytree(demo_run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"]["lr"] = 5e-4
    (other / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "compare" / "ablation.html"
    assert run_cli(monkeypatch, "report", demo_run, other, "--output", out) == 0
    page = out.read_text()
    assert "Keys that differ" in page and "<td>train.lr</td>" in page
    assert all((out.parent / f"ablation_{name}.png").is_file() for name in ("losses", "throughput", "retrieval"))
    assert (out.parent / "ablation_gallery_i2t_2.png").is_file()  # one gallery per run
    runs = read_runs([demo_run, other])
    fig = loss_figure(runs)
    for ax, term in zip(fig.axes, loss_terms(runs)):  # the term panels come first, lr and logit scale after
        assert {line.get_label() for line in ax.lines} >= {runs[0].label, runs[1].label}, term


def test_report_of_a_run_that_recorded_less(demo_run, tmp_path):
    """A stopped run (no summary, no model) made before notes.jsonl: the report says what is missing."""
    from unimlip_fast.report import write_report

    old = tmp_path / "old"
    shutil.copytree(
        demo_run, old, ignore=shutil.ignore_patterns("model.safetensors", "summary.json", "notes.jsonl", "report*")
    )
    with (old / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss/to')  # cut short by a kill
    files = write_report([old])
    page = files.html.read_text()
    assert any("model.safetensors" in p for p in files.problems) and "No gallery" in page
    assert "not recorded by this run" in page and "not finished: last logged step 6" in page
    assert "1 (not JSON; skipped)" in page
    assert set(files.figures) == {"losses", "throughput", "retrieval"}


def test_a_failing_report_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    import unimlip_fast.report

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(unimlip_fast.report, "write_report", broken)
    run = tmp_path / "run"
    assert (
        run_cli(
            monkeypatch,
            "pretrain",
            REPO / "configs/demo.yaml",
            "--run-dir",
            run,
            *TINY_RUN,
            "train.max_steps=2",
            "eval.split=",
        )
        == 0
    )
    assert (run / "summary.json").is_file() and (run / "model.safetensors").is_file()
    assert "report not written: RuntimeError: drawing failed" in (run / "notes.jsonl").read_text()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'unimlip-fast[wandb]')")
    from unimlip_fast.train.monitor import Monitor

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = Monitor(tmp_path, 2, enabled=True, report_to=["wandb"], config={"name": "tiny", "train": {"lr": 1e-3}})
    monitor.log(1, {"loss/total": 2.5, "phase": "warmup"})
    monitor.log(2, {"loss/total": 2.25, "retrieval/i2t_R@1": 3.0})
    monitor.close()
    run_id = (tmp_path / "wandb_id.txt").read_text()
    (events,) = tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    assert b"loss/total" in events.read_bytes() and b"retrieval/i2t_R@1" in events.read_bytes()
    assert not (tmp_path / "tb").exists()  # report_to without tensorboard writes no events


def test_report_to_is_checked():
    from unimlip_fast.config import ConfigError, load_config

    assert load_config(None, []).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=[tensorboard, mlflow]"])
