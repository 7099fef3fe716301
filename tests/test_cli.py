"""The `segformer` program as a whole: every command has --help, and shared argument forms parse alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import run_cli

from segformer.cli import build_parser
from segformer.commands import flatten
from segformer.commands.train import config_from_args

COMMANDS = ["convert", "demo", "eval", "export", "predict", "serve", "synth", "train"]


@pytest.mark.slow
def test_top_level_help_lists_every_command():
    """The installed entry point, in a process of its own."""
    out = subprocess.run([sys.executable, "-m", "segformer", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"    {name} " in out.stdout, name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: segformer {name}" in capsys.readouterr().out


@pytest.mark.parametrize("form", [["0.5", "1.0", "1.5"], ["0.5,1.0,1.5"], ["0.5,1.0", "1.5"]])
def test_scales_parse_alike_everywhere(form):
    parser = build_parser()
    assert flatten(parser.parse_args(["eval", "--data", "d", "--model", "m", "--scales", *form]).scales) == [
        0.5,
        1,
        1.5,
    ]
    assert flatten(parser.parse_args(["predict", "x.png", "--output", "o", "--scales", *form]).scales) == [0.5, 1, 1.5]
    train = parser.parse_args(["train", "--data", "d", "--eval-scales", *form])
    assert config_from_args(train).eval_scales == [0.5, 1.0, 1.5]


def test_bad_scales_are_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "eval", "--data", "d", "--model", "m", "--scales", "0,1")
    assert code == 2 and "scales must be positive" in err and "Traceback" not in err


def _broken_train(cfg):
    raise RuntimeError("boom: a bug deep inside\nsecond line")


def test_unexpected_errors_are_one_line_unless_debug(capsys, monkeypatch):
    """A RuntimeError/TypeError is one line by default; `segformer --debug` or SEGFORMER_DEBUG=1 re-raises it
    with its traceback."""
    from segformer.cli import main

    monkeypatch.setattr("segformer.train.train", _broken_train)
    monkeypatch.delenv("SEGFORMER_DEBUG", raising=False)
    code, _, err = run_cli(capsys, "train", "--data", "d")
    assert code == 2 and err == "segformer train: error: boom: a bug deep inside\n"
    with pytest.raises(RuntimeError, match="boom") as raised:
        main(["--debug", "train", "--data", "d"])
    assert raised.traceback[-1].name == "_broken_train"  # the whole traceback, down to where it was raised
    monkeypatch.setenv("SEGFORMER_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", "--data", "d"])
    monkeypatch.setenv("SEGFORMER_DEBUG", "0")
    code, _, err = run_cli(capsys, "train", "--data", "d")
    assert code == 2 and "Traceback" not in err


def test_expected_errors_stay_one_line_under_debug(capsys, monkeypatch, tmp_path):
    """ValueError/OSError are raised on purpose with a message for the user: one line even with --debug."""
    monkeypatch.setenv("SEGFORMER_DEBUG", "1")
    code, _, err = run_cli(capsys, "--debug", "eval", "--data", tmp_path, "--model", tmp_path / "none")
    assert code == 2 and err.startswith("segformer eval: error:") and err.count("\n") == 1
