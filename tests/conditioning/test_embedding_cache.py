"""The caption-embedding cache: round trip, deduplication, lookup, and invalidation on any encoder change."""

import pytest
import torch
from safetensors.torch import save_file

from conditioning import TextEmbeddingCache, TextEncoder, TextEncoderConfig

CAPTIONS = ["a photo of a cat", "a red bicycle", "a photo of a cat", "two dogs on a beach, sunset"]


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "captions.safetensors"


def test_cache_round_trip_gives_the_encoder_embeddings(small_encoder, cache_path):
    built = TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path, batch_size=2)
    assert built.captions == ["", "a photo of a cat", "a red bicycle", "two dogs on a beach, sunset"]  # deduplicated
    loaded = TextEmbeddingCache.load(cache_path, small_encoder)
    assert loaded.captions == built.captions and loaded.fingerprint == small_encoder.fingerprint()
    assert torch.equal(loaded.hidden_states, built.hidden_states) and torch.equal(loaded.pooled, built.pooled)

    batch = ["two dogs on a beach, sunset", "a photo of a cat", "", "a photo of a cat"]
    expected = small_encoder(batch)
    torch.testing.assert_close(loaded.encode(batch), expected.hidden_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(batch).pooled, expected.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.unconditional(3), small_encoder.unconditional(3), rtol=1e-5, atol=1e-5)
    assert (len(loaded), loaded.max_length, loaded.hidden_size) == (4, 77, 128)


def test_cache_is_invalidated_by_other_weights(small_encoder, cache_path):
    TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    other = TextEncoder.from_config(TextEncoderConfig(seed=1))
    with pytest.raises(ValueError, match="stale text-embedding cache"):
        TextEmbeddingCache.load(cache_path, other)
    rebuilt = TextEmbeddingCache.load_or_build(cache_path, other, CAPTIONS)
    assert rebuilt.fingerprint == other.fingerprint()
    assert TextEmbeddingCache.load(cache_path, other).fingerprint == other.fingerprint()
    torch.testing.assert_close(rebuilt.encode(CAPTIONS), other.encode(CAPTIONS), rtol=1e-5, atol=1e-5)


def test_cache_is_invalidated_by_a_single_changed_weight(small_encoder, cache_path):
    TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    other = TextEncoder.from_config(TextEncoderConfig())
    with torch.no_grad():
        other.model.final_layer_norm.bias[0] += 1e-3
    with pytest.raises(ValueError, match="stale"):
        TextEmbeddingCache.load(cache_path, other)


def test_cache_is_invalidated_by_layer_choice_and_tokenizer(small_encoder, cache_path):
    TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    skip = TextEncoder(small_encoder.model, small_encoder.tokenizer, TextEncoderConfig(clip_skip=1))
    with pytest.raises(ValueError, match="stale"):
        TextEmbeddingCache.load(cache_path, skip)
    changed = TextEncoder.from_config(TextEncoderConfig())
    changed.tokenizer.add_tokens(["<my-cat>"])  # e.g. a textual-inversion token
    assert changed.fingerprint() != small_encoder.fingerprint()
    with pytest.raises(ValueError, match="stale"):
        TextEmbeddingCache.load(cache_path, changed)


def test_load_or_build_reuses_a_valid_cache_and_extends_for_new_captions(small_encoder, cache_path):
    first = TextEmbeddingCache.load_or_build(cache_path, small_encoder, CAPTIONS)
    modified = cache_path.stat().st_mtime_ns
    again = TextEmbeddingCache.load_or_build(cache_path, small_encoder, CAPTIONS[:2])
    assert cache_path.stat().st_mtime_ns == modified and again.captions == first.captions
    extended = TextEmbeddingCache.load_or_build(cache_path, small_encoder, [*CAPTIONS, "a new caption"])
    assert "a new caption" in extended and len(extended) == 5


def test_uncached_caption_is_a_key_error_naming_it(small_encoder, cache_path):
    cache = TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    with pytest.raises(KeyError, match="a blue bicycle"):
        cache.encode(["a red bicycle", "a blue bicycle"])
    with pytest.raises(TypeError, match=r"captions\[0\]: is None"):
        cache.encode([None])


def test_trainable_encoder_cannot_be_cached(cache_path):
    encoder = TextEncoder.from_config(TextEncoderConfig(frozen=False, num_layers=1, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match="encoder: is trainable"):
        TextEmbeddingCache.build(encoder, CAPTIONS, cache_path)


def test_half_precision_storage(small_encoder, cache_path):
    cache = TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path, dtype=torch.float16)
    loaded = TextEmbeddingCache.load(cache_path, small_encoder)
    assert cache.hidden_states.dtype == loaded.hidden_states.dtype == torch.float16
    torch.testing.assert_close(loaded.encode(CAPTIONS).float(), small_encoder.encode(CAPTIONS), rtol=1e-2, atol=1e-2)


def test_missing_or_foreign_files_are_clear_errors(small_encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no text-embedding cache"):
        TextEmbeddingCache.load(tmp_path / "missing.safetensors", small_encoder)
    save_file({"x": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a text-embedding cache"):
        TextEmbeddingCache.load(tmp_path / "weights.safetensors", small_encoder)


def test_load_or_build_rebuilds_a_cache_of_another_format_version(small_encoder, cache_path):
    save_file({"hidden_states": torch.zeros(1)}, cache_path, metadata={"format": "ldm-text-embedding-cache/0"})
    cache = TextEmbeddingCache.load_or_build(cache_path, small_encoder, CAPTIONS)
    assert TextEmbeddingCache.load(cache_path, small_encoder).captions == cache.captions


def test_load_or_build_decides_staleness_from_the_header_alone(small_encoder, cache_path, monkeypatch):
    TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    other = TextEncoder.from_config(TextEncoderConfig(seed=1))
    read = []
    monkeypatch.setattr(TextEmbeddingCache, "_read", classmethod(lambda cls, path: read.append(path)))
    monkeypatch.setattr(TextEmbeddingCache, "build", classmethod(lambda cls, *args: "rebuilt"))
    assert TextEmbeddingCache.load_or_build(cache_path, other, CAPTIONS) == "rebuilt" and not read
