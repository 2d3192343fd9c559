import pytest
import torch
from torch import nn

from conditioning import TextEncoder, TextEncoderConfig
from ldm.data.shapes import POSITIONS, ShapesDataset
from ldm.evaluation.geometry import NO_OBJECT, geometric_positions
from ldm.evaluation.text_pathway import (
    ATTRIBUTES,
    PROBE_FIT,
    PROBE_TEST,
    attribute_pairs,
    labelled_captions,
    text_pathway,
)


def test_pairs_differ_in_one_attribute_alone_word_for_word():
    for attribute in ATTRIBUTES:
        for first, second in attribute_pairs(attribute, 40):
            words, other = first.split(), second.split()
            assert len(words) == len(other)  # no word moves: "center" pairs with "left", not "top left"
            changed = [i for i, (a, b) in enumerate(zip(words, other, strict=True)) if a != b]
            assert 1 <= len(changed) <= 2 and changed == list(range(changed[0], changed[-1] + 1))


def test_the_probe_is_scored_on_captions_it_was_not_fitted_on():
    fit, _ = labelled_captions(PROBE_FIT, 0)
    test, labels = labelled_captions(PROBE_TEST, 1, exclude=frozenset(fit))
    assert len(test) == PROBE_TEST == len(labels["shape"]) and not set(test) & set(fit)


class PositionBlind(nn.Module):
    """A real encoder that never sees the position words: what a collapsed position pathway looks like."""

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.inner = encoder

    def encode(self, captions):
        stripped = []
        for caption in captions:
            for position in sorted(POSITIONS, key=len, reverse=True):
                caption = caption.replace(position, "")
            stripped.append(caption)
        return self.inner.encode(stripped)


def test_an_encoder_blind_to_position_reads_as_such():
    encoder = TextEncoder.from_config(TextEncoderConfig(max_length=32))
    seeing, blind = text_pathway(encoder), text_pathway(PositionBlind(encoder))
    assert blind["position"]["distance"] < 1e-4 < seeing["position"]["distance"]
    assert blind["position"]["probe"] < 0.3 < 0.8 < seeing["position"]["probe"]  # chance is 1/9
    assert abs(blind["color"]["distance"] - seeing["color"]["distance"]) < 0.5 * seeing["color"]["distance"]
    assert blind["color"]["distance"] > 5


def test_geometric_position_reads_every_rendering_and_nothing_in_a_blank_image():
    data = ShapesDataset(300, 32, "heldout", include_novel=True)
    items = [data[i] for i in range(300)]
    images = torch.stack([item["pixel_values"] for item in items]) * 0.5 + 0.5
    assert geometric_positions(images) == [item["attributes"]["position"] for item in items]
    flipped = geometric_positions(images.flip(-1))  # left and right swap, the rest stays
    swap = {"left": "right", "right": "left"}
    for read, item in zip(flipped, items, strict=True):
        assert read == " ".join(swap.get(w, w) for w in item["attributes"]["position"].split())
    assert geometric_positions(torch.full((2, 3, 32, 32), 0.3)) == [NO_OBJECT, NO_OBJECT]


def test_a_bf16_encoder_reads_as_its_fp32_self():
    """Training in bf16 (mixed_precision, text_encoder.dtype) validates with the same diagnostic: it reads the
    conditioning in float32 whatever the encoder's dtype, so the figures agree up to bf16's rounding."""
    full = TextEncoder.from_config(TextEncoderConfig(max_length=32))
    half = TextEncoder.from_config(TextEncoderConfig(max_length=32, dtype="bfloat16"))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    exact, rounded = text_pathway(full), text_pathway(half)
    for attribute in ("color", "shape", "size", "position", "background"):
        assert rounded[attribute]["distance"] == pytest.approx(exact[attribute]["distance"], rel=0.05), attribute
        assert abs(rounded[attribute]["probe"] - exact[attribute]["probe"]) < 0.1, attribute
