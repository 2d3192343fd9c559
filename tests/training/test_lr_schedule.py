from pathlib import Path

import pytest
import torch

from conditioning import TextEncoderConfig
from ldm.config import ConfigError, load_config
from ldm.training import DiffusionExperimentConfig, train_diffusion
from ldm.training.config import TrainConfig
from ldm.training.lr_schedule import LRSchedule
from ldm.training.runtime import learning_rate_factor, train_schedule

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_schedule_warms_up_then_follows_its_shape_and_stops_at_stop_at():
    schedule = LRSchedule(2e-4, total_steps=100, warmup_steps=10, shape="constant", stop_at=50)
    assert schedule(0) == pytest.approx(2e-5)
    assert schedule(9) == pytest.approx(2e-4)
    assert schedule(49) == pytest.approx(2e-4)
    assert schedule(50) == schedule(99) == 0.0
    cosine = LRSchedule(1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert cosine(110) == pytest.approx(0.1)


def test_train_schedule_follows_the_train_sections_warmup_cosine_and_floor():
    tc = TrainConfig(steps=220, warmup_steps=20, lr=3e-4, lr_schedule="cosine", min_lr_ratio=0.2)
    expected = {0: 3e-4 / 20, 19: 3e-4, 20: 3e-4, 120: 3e-4 * (0.2 + 0.8 * 0.5), 220: 3e-4 * 0.2}
    for step, lr in expected.items():
        assert train_schedule(tc)(step) == pytest.approx(lr)
        assert learning_rate_factor(step, tc) == pytest.approx(lr / tc.lr)


def test_a_partial_text_encoder_section_keeps_the_stages_own_defaults():
    cfg = load_config(DiffusionExperimentConfig, None, ["text_encoder.lr=2e-4", "autoencoder=vae"])
    assert cfg.text_encoder.lr == 2e-4
    assert cfg.text_encoder.frozen is False and cfg.text_encoder.max_length == 32  # the CPU encoder, not CLIP's


def test_training_settings_on_a_frozen_encoder_are_refused_by_name():
    with pytest.raises(ValueError, match="lr, freeze_after: set for a frozen encoder"):
        TextEncoderConfig(frozen=True, lr=1e-4, freeze_after=10)
    with pytest.raises(ConfigError, match=r"text_encoder.*frozen"):
        load_config(DiffusionExperimentConfig, None, ["text_encoder.frozen=true", "text_encoder.lr=1e-4"])


def test_freezing_the_default_encoder_drops_its_training_settings():
    cfg = load_config(DiffusionExperimentConfig, None, ["text_encoder.frozen=true", "autoencoder=vae"])
    assert cfg.text_encoder.frozen is True and cfg.text_encoder.lr is None and cfg.text_encoder.weight_decay is None
    assert DiffusionExperimentConfig(autoencoder="vae").text_encoder.lr == 2e-4  # the default it froze trains


def test_text_encoder_trains_in_its_own_group_and_stops_at_freeze_after(tiny_config, tmp_path, caplog):
    cfg = tiny_config(steps=6, warmup_steps=0, lr=1e-3, lr_schedule="constant", weight_decay=0.0)
    cfg.text_encoder = TextEncoderConfig(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=16, frozen=False,
        train_token_embedding=True, token_rows="captions", lr=1e-2, lr_schedule="constant", warmup_steps=0,
        freeze_after=3,
    )  # fmt: skip
    cfg.train.ema_decay = 0.0
    snapshots = {}
    original = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):
        result = original(optimizer, *args, **kwargs)
        encoder_group = optimizer.param_groups[1]
        snapshots[len(snapshots)] = (
            [group["lr"] for group in optimizer.param_groups],
            [p.detach().clone() for p in encoder_group["params"]],
            all(p.grad is None for p in encoder_group["params"]),  # out of the clipped norm once frozen
        )
        return result

    with caplog.at_level("INFO"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", record)
        metrics = train_diffusion(cfg, tmp_path / "run")
    assert [lrs for lrs, _, _ in snapshots.values()] == [[1e-3, 1e-2]] * 3 + [[1e-3, 0.0]] * 3
    assert [no_grads for _, _, no_grads in snapshots.values()] == [False] * 3 + [True] * 3
    # From step 3 on the encoder's weights (its layers and its caption rows) no longer move.
    for step in (4, 5):
        for before, after in zip(snapshots[3][1], snapshots[step][1], strict=True):
            assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0][1], snapshots[2][1], strict=True))
    assert metrics["lr_by_group"] == {"unet": 1e-3, "text_encoder": 0.0}
    assert "trains text encoder" in caplog.text and "frozen from step 3" in caplog.text
    assert "caption rows train" in caplog.text


@pytest.mark.parametrize("name", ["diffusion_sd_256.yaml", "diffusion_sd_512.yaml", "finetune_sd15.yaml"])
def test_gpu_configs_keep_what_their_partial_sections_say(name):
    """A partial section lays over the stage's own (CPU) defaults, so a GPU config spells out where it differs:
    eps with the paper's min-SNR, and a frozen pretrained CLIP with its 77 tokens."""
    cfg = load_config(DiffusionExperimentConfig, REPO_ROOT / "configs" / name, ["autoencoder=vae"])
    assert (cfg.noise.prediction, cfg.loss.min_snr_gamma, cfg.loss.min_snr_of) == ("eps", 5.0, "snr")
    assert cfg.loss.timestep_sampling == "uniform"
    assert cfg.text_encoder.pretrained and cfg.text_encoder.frozen and cfg.text_encoder.max_length == 77
    assert cfg.text_encoder.lr is None and cfg.text_encoder.token_rows == "all"


def test_a_pretrained_encoder_starts_from_clips_defaults_not_the_small_trained_one():
    cfg = load_config(DiffusionExperimentConfig, None, ["autoencoder=vae", "text_encoder.pretrained=some/clip"])
    assert cfg.text_encoder == TextEncoderConfig(pretrained="some/clip")  # frozen, 77 tokens, no training fields
