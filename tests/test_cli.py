"""The `llmtrain` entry point: subcommands are registered and `info` reports the build."""

import subprocess
import sys

from llmtrain.cli import main


def test_help_lists_every_subcommand(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "sft", "rlhf", "generate", "data", "info"):
        assert command in out


def test_info_reports_backends():
    proc = subprocess.run([sys.executable, "-m", "llmtrain", "info"], capture_output=True, text=True, check=True)
    assert "native backends" in proc.stdout and "cpu" in proc.stdout


def test_unknown_arguments_are_rejected(capsys):
    try:
        main(["info", "--bogus"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_pretrain_config_error_names_the_key(capsys):
    assert main(["pretrain", "--batch_sise", "4"]) == 2
    assert "batch_sise: unknown key" in capsys.readouterr().err
