"""`unimlip-fast ablate`: the paper's rows (terms, views, statistics), the paired bootstrap and its
verdicts, and a tiny base plus two rows of each table on phantom data through the command, stopped
and picked up again without rerunning what finished."""

import json

import numpy as np
import pytest

from unimlip_fast.ablation import (
    TABLES,
    markdown_tables,
    paired_bootstrap,
    parse_tables,
    rows_of,
    run_config,
    summarise,
    verdict,
)
from unimlip_fast.config import ConfigError

from .helpers import REPO, TINY_OVERRIDES, read_metrics, run_cli

TINY_ABLATION = TINY_OVERRIDES + [
    "data.format=phantom",
    "data.phantom_size=64",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.max_steps=3",
    "train.lr=1e-3",
    "eval.split=dev+test",
    "model.text.hidden_dropout=0.0",
]


def _on(cfg) -> set[str]:
    return {t for t in ("itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm") if getattr(cfg.loss, t) > 0}


# What the paper's rows are: (terms, strong views through the image encoder, statistics frozen).
PAPER_ROWS = {
    3: [
        ({"itc", "mlm"}, False, False),
        ({"itc", "mlm", "simclr"}, True, False),
        ({"itc", "mlm"}, True, False),
        ({"itc", "mlm", "simclr"}, True, True),
    ],
    4: [
        ({"itc", "mlm"}, False, False),
        ({"itc", "mlm", "itc_img_fp"}, False, False),
        ({"itc", "mlm", "itc_txt_fp"}, False, False),
        ({"itc", "mlm", "simclr"}, True, True),
        ({"itc", "mlm", "itc_img_fp", "itc_txt_fp", "simclr"}, True, True),
    ],
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_rows_are_the_papers(table, tmp_path):
    assert len(TABLES[table]) == len(PAPER_ROWS[table])
    for row, (terms, views, frozen) in zip(TABLES[table], PAPER_ROWS[table]):
        cfg = run_config(REPO / "configs/demo.yaml", row, 7, [], tmp_path / "base")
        assert cfg.train.seed == 7 and cfg.model.init_from == str((tmp_path / "base").resolve())
        assert _on(cfg) == terms, row.key
        weights = {"itc": 0.167, "itc_img_fp": 0.167, "itc_txt_fp": 0.167, "simclr": 0.5, "mlm": 0.5}
        assert all(getattr(cfg.loss, t) == (w if t in terms else 0.0) for t, w in weights.items()), row.key
        # Strong views through the encoder: in the second phase, which starts at the row's first step.
        fed = cfg.data.strong_views == "on" or (cfg.data.strong_views == "auto" and cfg.loss.simclr > 0)
        assert fed == views, row.key
        assert cfg.train.simclr_start == "0"
        assert (cfg.loss.freeze_bn_stats and fed) == frozen, row.key
    assert TABLES[table][0].paper_r1 == (22.2, 21.7)


def test_tables_share_their_common_rows():
    assert parse_tables("3,4") == [3, 4]
    keys = [r.key for r in rows_of([3, 4])]
    assert len(keys) == 7 and len(set(keys)) == 7
    with pytest.raises(ConfigError, match="--table"):
        parse_tables("5")
    with pytest.raises(ConfigError, match="no row 'nope'"):
        rows_of([3], ["nope"])


def test_summary_is_mean_and_sample_spread():
    per_seed = {
        s: {"n": 10, "i2t": {"R@1": v, "R@5": v, "R@10": v}, "t2i": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0}}
        for s, v in ((0, 10.0), (1, 20.0))
    }
    summary = summarise(per_seed)
    assert summary["i2t"]["R@1"] == {"mean": 15.0, "std": 7.07, "min": 10.0, "max": 20.0}
    assert summary["t2i"]["R@10"]["std"] == 0.0


def test_paired_bootstrap_and_verdicts():
    rng = np.random.default_rng(3)
    b = rng.integers(1, 40, size=(3, 200))
    # Identical rows: no difference, an interval of exactly 0, so nothing can be told.
    assert paired_bootstrap(b, b, 1, samples=500) == (0.0, 0.0, 0.0)
    # A better on 30 of 200 queries in every seed (rank 1 where B had rank 2): +15 points, interval > 0.
    a, b = np.full((3, 200), 2), np.full((3, 200), 2)
    a[:, :30] = 1
    diff, low, high = paired_bootstrap(a, b, 1, samples=2000)
    assert diff == pytest.approx(15.0) and 9.0 < low < 15.0 < high < 21.0
    assert verdict(low, high, expected=+3.5) == "holds" and verdict(low, high, expected=-17.2) == "reversed"
    # Pairing: B = A's ranks with noise that is the same for both rows except on a few queries.
    a = rng.integers(1, 60, size=(3, 300))
    b = a.copy()
    b[:, :6] = 100  # A wins 6 queries at R@10 wherever A had them in its top 10
    diff, low, high = paired_bootstrap(a, b, 10, samples=2000)
    assert diff == pytest.approx(100.0 * (a[:, :6] <= 10).mean() * 6 / 300)
    assert low >= 0.0 and verdict(low, high, +1.0) in ("holds", "cannot tell")
    assert verdict(-1.0, 2.0, +1.0) == "cannot tell"
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap(a, b[:, :10], 1)


def _bn_buffers(run_dir):
    from safetensors.torch import load_file

    state = load_file(str(run_dir / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith("visual.") and k.endswith(("running_mean", "running_var"))}


@pytest.mark.slow
def test_ablate_base_and_two_rows_of_each_table(tmp_path, monkeypatch):
    """A base, then rows 1 and 3 of Table 3 and row 2 of Table 4 (rows 1 and 2 of Table 4; row 1 run
    once for both), two seeds; stopped part-way through the first seed and picked up again."""
    import unimlip_fast.train.engine as engine

    calls, stop_at = [], [4]
    pretrain = engine.pretrain

    def stopped_part_way(cfg, ds_config, run_dir, resume, overwrite):
        calls.append(run_dir)
        if len(calls) == stop_at[0]:  # the base, seed 0 of rows 1 and 2, then stopped
            raise KeyboardInterrupt
        return pretrain(cfg, ds_config, run_dir, resume, overwrite)

    monkeypatch.setattr(engine, "pretrain", stopped_part_way)
    out = tmp_path / "ablation"
    args = [
        "ablate",
        REPO / "configs/demo.yaml",
        *TINY_ABLATION,
        "--table",
        "3,4",
        "--seeds",
        "2",
        "--rows",
        "itc_mlm,views_no_simclr,itc_img_fp",
        "--base-epochs",
        "1",
        "--out",
        out,
        "--ds-config",
        REPO / "configs/zero2_fp32.json",
    ]
    assert run_cli(monkeypatch, *args) == 130
    assert [p.relative_to(out).as_posix() for p in calls] == [
        "base",
        "itc_mlm/seed0",
        "views_no_simclr/seed0",
        "itc_img_fp/seed0",
    ]
    partial = json.loads((out / "results.json").read_text())
    assert partial["rows"]["itc_mlm"]["seeds_done"] == [0] and partial["rows"]["views_no_simclr"]["seeds_done"] == [0]
    assert partial["rows"]["itc_img_fp"]["seeds_done"] == []
    assert partial["tables"]["3"]["comparisons"][0]["seeds"] == [0]  # paired on the seed both rows have

    calls.clear()
    stop_at[0] = 0
    assert run_cli(monkeypatch, *args) == 0
    assert [p.relative_to(out).as_posix() for p in calls] == [  # the base and the finished runs not rerun
        "itc_img_fp/seed0",
        "itc_mlm/seed1",
        "views_no_simclr/seed1",
        "itc_img_fp/seed1",
    ]
    results = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text() == markdown_tables(results)
    table = (out / "table.md").read_text()
    assert "| 22.2 |" in table and "views_no_simclr vs itc_mlm" in table and "itc_img_fp vs itc_mlm" in table

    # The base: PMC-CLIP's objective, one epoch (64 / 16 = 4 steps), no second phase.
    base_steps = [m for m in read_metrics(out / "base") if "loss/total" in m]
    assert len(base_steps) == 4 and {m["phase"] for m in base_steps} == {"warmup"}
    assert {k for k in base_steps[0] if k.startswith("loss/")} == {"loss/itc", "loss/mlm", "loss/total"}
    base_bn = _bn_buffers(out / "base")
    rows = {r.key: r for r in rows_of([3, 4])}
    for key in ("itc_mlm", "views_no_simclr", "itc_img_fp"):
        row = results["rows"][key]
        assert row["seeds_done"] == [0, 1]
        n = row["n_queries"]
        assert all(len(q["i2t"]) == n == len(q["keys"]) for q in row["per_query"].values())
        for seed in (0, 1):
            run = out / key / f"seed{seed}"
            steps = [m for m in read_metrics(run) if "loss/total" in m]
            # Every row continues the base (its notes say so) and trains the recipe's length.
            notes = (run / "notes.jsonl").read_text()
            assert f"init from {(out / 'base').resolve()}" in notes and len(steps) == 3
            terms = {k.removeprefix("loss/") for k in steps[0] if k.startswith("loss/")} - {"total"}
            assert terms == set(rows[key].terms)
            # The strong views go through the encoder from the row's first step; never a warm-up phase.
            assert {m["phase"] for m in steps} == ({"simclr"} if key == "views_no_simclr" else {"warmup"})
            # Statistics not frozen in these rows: the views and the weak view move them off the base's.
            assert any(not np.allclose(v.numpy(), base_bn[k].numpy()) for k, v in _bn_buffers(run).items())
    comparison = results["tables"]["3"]["comparisons"][0]
    assert comparison["row"] == "views_no_simclr" and comparison["against"] == "itc_mlm"
    assert comparison["seeds"] == [0, 1]
    for name in ("i2t R@1", "t2i R@1", "i2t R@10", "t2i R@10"):
        c = comparison[name]
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1] and c["paper_difference"] < 0
        assert c["verdict"] in ("holds", "reversed", "cannot tell")


@pytest.mark.slow
def test_a_frozen_row_keeps_the_bases_statistics(tmp_path, monkeypatch, capsys):
    """Table 3's row 4 freezes the BatchNorm statistics from its first step: the run ends with the
    base's running statistics exactly, while its affine weights learn."""
    out = tmp_path / "ablation"
    args = [
        "ablate",
        REPO / "configs/demo.yaml",
        *TINY_ABLATION,
        "train.max_steps=2",
        "--table",
        "3",
        "--rows",
        "simclr_frozen",
        "--base-epochs",
        "1",
        "--out",
        out,
        "--ds-config",
        REPO / "configs/zero2_fp32.json",
    ]
    assert run_cli(monkeypatch, *args) == 0
    base_bn, row_bn = _bn_buffers(out / "base"), _bn_buffers(out / "simclr_frozen/seed0")
    assert base_bn.keys() == row_bn.keys() and len(base_bn) > 0
    assert all(np.array_equal(row_bn[k].numpy(), base_bn[k].numpy()) for k in base_bn)
    steps = [m for m in read_metrics(out / "simclr_frozen/seed0") if "loss/total" in m]
    assert {m["phase"] for m in steps} == {"simclr"} and all("loss/simclr" in m for m in steps)
    # The same folder asked for with other settings is refused, naming what differs.
    capsys.readouterr()
    code = run_cli(monkeypatch, *args[:-4], "train.lr=2e-3", *args[-4:])
    assert code != 0 and "holds a run with other settings (train.lr: 0.001 there, 0.002 now)" in " ".join(
        capsys.readouterr().err.split()
    )


def test_ablate_refuses_a_recipe_without_evaluation(tmp_path, monkeypatch, capsys):
    code = run_cli(monkeypatch, "ablate", REPO / "configs/demo.yaml", "eval.split=", "--out", tmp_path)
    assert code != 0 and "eval.split" in capsys.readouterr().err
