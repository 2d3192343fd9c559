"""End to end on a 2-D toy: the diffusion core learns a mixture of 8 Gaussians, and the bound improves."""

import json

import pytest

from ldm.commands.toy import format_report, run_toy
from ldm.config import load_config
from ldm.toy import ToyConfig


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("toy")
    return run_toy(load_config(ToyConfig), output_dir, progress=False), output_dir


@pytest.mark.training
def test_toy_samples_cover_every_mode_with_ddpm_and_ddim(toy_run):
    metrics, _ = toy_run
    for sampler in ("ddpm", "ddim"):
        scores = metrics["samplers"][sampler]
        assert scores["within_3_sigma"] >= 0.90, sampler
        assert scores["modes_hit"] == 8, sampler
        assert min(scores["mode_fractions"]) >= 0.08, sampler  # balanced: 1/8 = 0.125 each


@pytest.mark.training
def test_toy_bound_falls_and_learned_range_beats_fixed_large(toy_run):
    metrics, _ = toy_run
    bound = metrics["bound_bits_per_dim"]
    assert bound["after"] < bound["before"] - 10
    assert metrics["baseline"]["variance"] == "fixed_large"
    assert bound["after"] < metrics["baseline"]["bound_bits_per_dim"]


@pytest.mark.training
def test_toy_writes_its_outputs(toy_run):
    metrics, output_dir = toy_run
    assert (output_dir / "samples" / "toy.png").stat().st_size > 1000
    assert load_config(ToyConfig, output_dir / "config.yaml") == ToyConfig()
    assert json.loads((output_dir / "metrics.json").read_text())["samplers"]["ddpm"]["modes_hit"] == 8
    assert "DDIM (50 steps)" in format_report(metrics)
