"""`unimlip-fast ablate`: every row is a valid recipe; a short table on phantom data end to end,
stopped after a row and picked up again without rerunning what finished."""
import json

import pytest

from unimlip_fast.ablation import TABLES, markdown_table, run_config, summarise

from .helpers import REPO, TINY_OVERRIDES, run_cli

TINY_ABLATION = TINY_OVERRIDES + [
    "data.format=phantom", "data.phantom_size=96", "data.num_workers=0", "train.batch_size=16",
    "train.log_every=1", "train.warmup_steps=1", "train.max_steps=4", "train.simclr_start=2", "train.lr=1e-3",
    "eval.split=test",
]


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_row_is_a_valid_recipe(table):
    for row in TABLES[table]:
        cfg = run_config(REPO / "configs/demo.yaml", row, 7, [])
        assert cfg.train.seed == 7
        on = {t for t in ("itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm") if getattr(cfg.loss, t) > 0}
        assert "itc" in on, row.key
        if table == 4 and row.key != "all":
            assert len(on) == 4, row.key  # exactly one term removed
    assert {r.key for r in TABLES[3]} >= {"itc", "simclr", "simclr_frozen_bn", "feature_perturbation", "all"}


def test_summary_is_mean_and_sample_spread():
    per_seed = {s: {"n": 10, "i2t": {"R@1": v, "R@5": v, "R@10": v}, "t2i": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0}}
                for s, v in ((0, 10.0), (1, 20.0))}
    summary = summarise(per_seed)
    assert summary["i2t"]["R@1"] == {"mean": 15.0, "std": 7.07, "min": 10.0, "max": 20.0}
    assert summary["t2i"]["R@10"]["std"] == 0.0


def test_ablate_runs_stops_and_resumes_row_by_row(tmp_path, monkeypatch):
    import unimlip_fast.train.engine as engine

    calls = []
    pretrain = engine.pretrain

    def interrupted_after_one_row(cfg, ds_config, run_dir, resume, overwrite):
        calls.append(run_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped at the start of the second row
        return pretrain(cfg, ds_config, run_dir, resume, overwrite)

    monkeypatch.setattr(engine, "pretrain", interrupted_after_one_row)
    out = tmp_path / "ablation"
    args = ["ablate", REPO / "configs/demo.yaml", *TINY_ABLATION, "--table", "3", "--seeds", "2",
            "--rows", "itc_views,all", "--out", out, "--ds-config", REPO / "configs/zero2_fp32.json"]
    assert run_cli(monkeypatch, *args) == 130
    partial = json.loads((out / "results.json").read_text())
    assert partial["rows"]["itc_views"]["seeds_done"] == [0, 1] and partial["rows"]["all"]["seeds_done"] == []

    calls.clear()
    assert run_cli(monkeypatch, *args) == 0
    assert [p.relative_to(out).as_posix() for p in calls] == ["all/seed0", "all/seed1"]  # the first row not rerun
    results = json.loads((out / "results.json").read_text())
    for key in ("itc_views", "all"):
        row = results["rows"][key]
        assert row["seeds_done"] == [0, 1]
        for direction in ("i2t", "t2i"):
            assert set(row["summary"][direction]) == {"R@1", "R@5", "R@10"}
            assert 0.0 <= row["summary"][direction]["R@10"]["mean"] <= 100.0
    assert (out / "table.md").read_text() == markdown_table(results)
    assert "ITC, strong views fed" in (out / "table.md").read_text()

    # Strong views fed without SimCLR: a second phase, no SimCLR term.
    metrics = [json.loads(line) for line in (out / "itc_views/seed0/metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss/total" in m]
    assert [m["phase"] for m in steps] == ["warmup", "warmup", "simclr", "simclr"]
    assert not any("loss/simclr" in m for m in steps)
    all_steps = [json.loads(line) for line in (out / "all/seed1/metrics.jsonl").read_text().splitlines()]
    assert any("loss/simclr" in m for m in all_steps)


def test_ablate_refuses_a_recipe_without_evaluation(tmp_path, monkeypatch, capsys):
    code = run_cli(monkeypatch, "ablate", REPO / "configs/demo.yaml", "eval.split=", "--out", tmp_path)
    assert code != 0 and "eval.split" in capsys.readouterr().err
