"""The command line as a user meets it: usage errors, messages in words, shipped configs found by
name, logs that are not wrapped, no run folder left by a failed start."""

import pytest

from unimlip_fast.config import ConfigError, find_config_file, load_config

from .helpers import REPO, TINY_RUN, run_cli


def test_missing_argument_exits_2_with_usage(monkeypatch, capsys):
    assert run_cli(monkeypatch, "eval", "retrieval", "--data", "phantom:8") == 2
    err = capsys.readouterr().err
    assert "Usage:" in err and "--checkpoint" in err and "MissingParameter" not in err


def test_bad_value_is_worded_not_a_class_name(monkeypatch, capsys):
    assert run_cli(monkeypatch, "data", "pack", "--format", "dicom", "--input", "x", "--output", "y") == 2
    err = capsys.readouterr().err
    assert "medpix, pmc-oa, roco, csv, jsonl" in err and "BadParameter" not in err


def test_unknown_key_names_the_closest_first():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.bach_size=8"])
    message = str(e.value)
    assert message.index("train.batch_size") < message.index("valid keys")


def test_choices_come_from_the_literal_types():
    with pytest.raises(ConfigError, match="data.backend must be one of cpu, torch, dali, auto"):
        load_config(None, ["data.backend=gpu"])
    with pytest.raises(ConfigError, match="model.kernels must be one of auto, reference, triton"):
        load_config(None, ["model.kernels=fast"])


def test_yaml_error_names_the_file(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  batch_size: [8\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line \d+"):
        load_config(recipe)


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config_file("zero2.json").read_text() == (REPO / "configs/zero2.json").read_text()
    assert find_config_file("configs/demo.yaml").read_text() == (REPO / "configs/demo.yaml").read_text()
    (tmp_path / "zero2.json").write_text("{}")
    assert find_config_file("zero2.json") == tmp_path.joinpath("zero2.json").relative_to(tmp_path)  # a local file wins
    assert not find_config_file("elsewhere/zero2.json").exists()  # a path with a folder is taken as given


def test_long_lines_are_not_wrapped_off_a_terminal(capsys):
    from unimlip_fast.console import make_console

    line = " ".join(f"step {k} loss/itc=4.15 30.2 samples/s /a/long/path/to/runs/folder_{k}" for k in range(4))
    make_console().print(line, highlight=False)
    assert capsys.readouterr().err.strip() == line


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "pairs.csv").write_text("file,text\nnope.png,a caption\n")
    run = tmp_path / "run"
    code = run_cli(
        monkeypatch,
        "pretrain",
        REPO / "configs/demo.yaml",
        "--run-dir",
        run,
        *TINY_RUN,
        "data.format=csv",
        f"data.path={tmp_path / 'pairs.csv'}",
        "data.image_key=file",
        "data.caption_key=text",
        "data.split=",
    )
    assert code == 1 and "missing_image" in capsys.readouterr().err
    assert not run.exists()


def test_version(monkeypatch, capsys):
    from unimlip_fast import __version__

    assert run_cli(monkeypatch, "--version") == 0
    assert capsys.readouterr().out.strip() == f"unimlip-fast {__version__}"


def test_eval_names_a_missing_data_folder_before_loading_the_model(tiny_run, tmp_path, monkeypatch, capsys):
    import unimlip_fast.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded first")

    monkeypatch.setattr(unimlip_fast.loading, "load", no_load)
    missing = tmp_path / "nowhere"
    for command in (["eval", "retrieval"], ["embed", "--output", tmp_path / "index"]):
        assert run_cli(monkeypatch, *command, "--checkpoint", tiny_run, "--data", f"medpix:{missing}") == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: --data medpix:{missing}: {missing} not found"


def test_a_run_folder_that_does_not_exist_is_said_so(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nonexistent" / "run"
    for command in (["report", missing], ["eval", "retrieval", "--checkpoint", missing, "--data", "phantom:8"]):
        assert run_cli(monkeypatch, *command) == 1
        assert capsys.readouterr().err.strip() == f"error: run folder not found: {missing}"


def _command_paths(command, path=()):
    """Every command under the CLI's click group, as the words that name it (the root is ())."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_help_shows_boolean_flags_without_a_value_placeholder():
    import re

    import typer
    from typer.testing import CliRunner

    from unimlip_fast.cli import app

    placeholder = re.compile(r"<bool(ean)?>|\bBOOLEAN\b|\[bool\]", re.IGNORECASE)
    runner = CliRunner()
    paths = list(_command_paths(typer.main.get_command(app)))
    assert len(paths) > 10  # the walk found the subcommands of eval, data and finetune
    for path, command in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        words = " ".join(path) or "(root)"
        assert result.exit_code == 0, f"{words} --help: {result.output}"
        assert not placeholder.search(result.output), f"{words} --help shows a value for a flag:\n{result.output}"
        for param in command.params:  # each flag is still listed, under its own name
            if getattr(param, "is_flag", False) and not param.hidden:
                assert all(opt in result.output for opt in param.opts), f"{words} --help lacks {param.opts}"
