"""Shared fixtures: one small default text encoder per test session (building one takes about a second)."""

import pytest
import torch

from conditioning import TextEncoder, TextEncoderConfig


@pytest.fixture(scope="session")
def small_encoder() -> TextEncoder:
    """The default CPU encoder (random, frozen); tests must not change it in place."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return TextEncoder.from_config(TextEncoderConfig())
