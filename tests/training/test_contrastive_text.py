"""text_pretraining: the contrastive pre-training of a small text encoder on (latent, caption) pairs."""

import math

import pytest
import torch

from conditioning import TextEncoder, TextEncoderConfig
from ldm.training import DiffusionExperimentConfig
from ldm.training.contrastive_text import TextPretrainingConfig, clip_loss, pretrain_text_encoder, token_mean

COLORS = ("red", "blue", "green", "yellow")
SHAPES = ("circle", "square")


def small_encoder(frozen: bool = False) -> TextEncoder:
    config = TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=16,
                               frozen=frozen, seed=0)  # fmt: skip
    return TextEncoder.from_config(config)


def pairs() -> list[dict]:
    """Latents whose channels say the caption's colour and shape: what an image tower can learn to match."""
    items = []
    for i in range(64):
        color, shape = COLORS[i % 4], SHAPES[(i // 4) % 2]
        mean = torch.zeros(4, 4, 4)
        mean[COLORS.index(color)] = 1.0
        mean[:, :2] *= 1.0 if shape == "circle" else -1.0
        moments = torch.cat([mean, torch.full_like(mean, -8.0)])  # nearly deterministic posterior
        items.append({"moments": moments, "caption": f"a {color} {shape}"})
    return items


def test_clip_loss_matches_its_closed_form():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    log_scale = torch.tensor(math.log(3.0))
    # cosines: [[1, 1/sqrt2], [0, 1/sqrt2]] times 3; each direction's cross-entropy on the diagonal
    logits = 3 * torch.tensor([[1.0, 2**-0.5], [0.0, 2**-0.5]])
    rows = -torch.log_softmax(logits, 1).diagonal().mean()
    columns = -torch.log_softmax(logits, 0).diagonal().mean()
    torch.testing.assert_close(clip_loss(image, text, log_scale), 0.5 * (rows + columns))


def test_pretraining_lowers_the_contrastive_loss_and_separates_the_words_the_images_tell_apart():
    encoder = small_encoder()
    captions = ["a red circle", "a red square"]
    with torch.no_grad():
        before = token_mean(encoder, captions)
    cfg = TextPretrainingConfig(steps=80, batch_size=16, lr=3e-3)
    losses = pretrain_text_encoder(encoder, pairs(), 1.0, cfg, torch.device("cpu"))
    with torch.no_grad():
        after = token_mean(encoder, captions)
    assert losses[-1] < 0.6 * losses[0]
    # The shape word moves the caption's mean state further once the images have told the shapes apart.
    assert (after[0] - after[1]).norm() > 1.5 * (before[0] - before[1]).norm()


def test_a_frozen_encoder_is_refused_by_name():
    with pytest.raises(ValueError, match=r"text_pretraining.steps: pre-trains the text encoder"):
        pretrain_text_encoder(small_encoder(frozen=True), pairs(), 1.0, TextPretrainingConfig(steps=1), "cpu")
    with pytest.raises(ValueError, match=r"text_pretraining.steps: pre-trains the text encoder"):
        DiffusionExperimentConfig(
            autoencoder="runs/none/vae", text_encoder=TextEncoderConfig(frozen=True),
            text_pretraining=TextPretrainingConfig(steps=10),
        )  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("steps", -1), ("batch_size", 1), ("lr", 0.0)])
def test_bad_settings_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"text_pretraining.{key}"):
        TextPretrainingConfig(**{key: value})
