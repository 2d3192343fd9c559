"""The `ldm` command line."""

import subprocess
import sys

import pytest

from ldm.cli import COMMAND_MODULES, main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    modules = {"quickstart", "train", "distill", "precompute", "generate", "invert", "interpolate", "evaluate"}
    modules |= {"serve", "toy"}
    assert set(COMMAND_MODULES) == modules
    commands = ("quickstart", "train-autoencoder", "train-diffusion", "precompute-latents", "generate", "evaluate")
    for name in (*commands, "invert", "interpolate", "toy", "distill"):
        assert name in out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ldm", "--help"], capture_output=True, text=True, check=True)
    assert "usage: ldm" in result.stdout


def test_building_the_command_line_imports_no_heavy_library():
    # `ldm --help` stays instant: the commands import torch and diffusers only when they run.
    script = (
        "import sys\n"
        "from ldm.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted({'torch', 'diffusers', 'PIL', 'fastapi', 'uvicorn'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_bad_override_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--output-dir", str(tmp_path), "--set", "train.stepz=3"])
    assert exit_info.value.code == 2
    assert "ldm toy: error: <defaults>: unknown key 'train.stepz'" in capsys.readouterr().err


@pytest.mark.parametrize(("world_size", "leaves"), [("2", True), ("1", False)])
def test_a_launched_rank_leaves_without_teardown_once_its_command_is_done(monkeypatch, world_size, leaves):
    import ldm.cli
    import ldm.commands.toy

    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(ldm.commands.toy, "main", lambda args: 0)
    left = []
    monkeypatch.setattr(ldm.cli, "leave_without_teardown", left.append)
    assert main(["toy"]) == 0
    assert left == ([0] if leaves else [])


def test_leaving_without_teardown_flushes_output_and_skips_exit_handlers():
    script = (
        "import atexit, logging\n"
        "atexit.register(print, 'teardown ran')\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "print('work done', end='')\n"
        "logging.getLogger('x').info('logged')\n"
        "from ldm.cli import leave_without_teardown\n"
        "leave_without_teardown(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 3
    assert result.stdout == "work done" and "logged" in result.stderr
