"""Caption dropout for classifier-free guidance: rate, determinism, edge probabilities."""

import math

import pytest
import torch

from conditioning import drop_captions


def test_caption_dropout_rate_is_within_binomial_bounds():
    n, p = 20_000, 0.1
    dropped = drop_captions(["a cat"] * n, p, torch.Generator().manual_seed(0)).count("")
    mean, std = n * p, math.sqrt(n * p * (1 - p))  # Binomial(n, p): 2000 +- 42.4
    assert abs(dropped - mean) < 5 * std


def test_dropout_keeps_captions_it_does_not_drop():
    captions = [f"caption {i}" for i in range(1000)]
    out = drop_captions(captions, 0.3, torch.Generator().manual_seed(1))
    assert all(o in ("", c) for o, c in zip(out, captions, strict=True))


def test_same_generator_seed_drops_the_same_captions():
    captions = [f"caption {i}" for i in range(200)]
    a = drop_captions(captions, 0.5, torch.Generator().manual_seed(7))
    b = drop_captions(captions, 0.5, torch.Generator().manual_seed(7))
    c = drop_captions(captions, 0.5, torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_p_zero_keeps_all_and_p_one_drops_all():
    captions = ["a", "b", "c"]
    assert drop_captions(captions, 0.0) == captions
    assert drop_captions(captions, 1.0) == ["", "", ""]


def test_bad_arguments_are_errors_naming_them():
    with pytest.raises(ValueError, match="p_uncond"):
        drop_captions(["a"], 1.2)
    with pytest.raises(TypeError, match=r"captions\[0\]: is None"):
        drop_captions([None], 0.1)
