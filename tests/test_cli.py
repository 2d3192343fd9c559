"""The `ldm` command line."""

import subprocess
import sys

import pytest

from ldm.cli import COMMAND_MODULES, main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert set(COMMAND_MODULES) == {"quickstart", "train", "precompute", "generate", "evaluate", "toy"}
    commands = ("quickstart", "train-autoencoder", "train-diffusion", "precompute-latents", "generate", "evaluate")
    for name in (*commands, "toy"):
        assert name in out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ldm", "--help"], capture_output=True, text=True, check=True)
    assert "usage: ldm" in result.stdout


def test_a_bad_override_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--output-dir", str(tmp_path), "--set", "train.stepz=3"])
    assert exit_info.value.code == 2
    assert "ldm toy: error: <defaults>: unknown key 'train.stepz'" in capsys.readouterr().err
