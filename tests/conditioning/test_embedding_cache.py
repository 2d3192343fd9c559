"""The caption-embedding cache: round trip, deduplication, lookup, invalidation on any encoder change, and
a build split over ranks in resumable parts."""

import pytest
import torch

from conditioning import TextEmbeddingCache, TextEncoder, TextEncoderConfig
from conditioning.sharded_cache import MANIFEST, part_path

CAPTIONS = ["a photo of a cat", "a red bicycle", "a photo of a cat", "two dogs on a beach, sunset"]


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "captions"


def test_cache_round_trip_gives_the_encoder_embeddings(small_encoder, cache_path):
    built = TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path, batch_size=2)
    assert built.captions == ["", "a photo of a cat", "a red bicycle", "two dogs on a beach, sunset"]  # deduplicated
    loaded = TextEmbeddingCache.load(cache_path, small_encoder)
    assert loaded.captions == built.captions and loaded.fingerprint == small_encoder.fingerprint()
    assert torch.equal(loaded.encode(loaded.captions), built.encode(built.captions))
    assert torch.equal(loaded(loaded.captions).pooled, built(built.captions).pooled)

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
    modified = (cache_path / MANIFEST).stat().st_mtime_ns
    again = TextEmbeddingCache.load_or_build(cache_path, small_encoder, CAPTIONS[:2])
    assert (cache_path / MANIFEST).stat().st_mtime_ns == modified and again.captions == first.captions
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
    assert cache.encode(CAPTIONS).dtype == loaded.encode(CAPTIONS).dtype == torch.float16
    torch.testing.assert_close(loaded.encode(CAPTIONS).float(), small_encoder.encode(CAPTIONS), rtol=1e-2, atol=1e-2)


def test_missing_or_unfinished_caches_are_clear_errors(small_encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished text-embedding cache"):
        TextEmbeddingCache.load(tmp_path / "missing", small_encoder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text('{"format": "ldm-text-embedding-cache/0"}')
    with pytest.raises(FileNotFoundError, match="no finished text-embedding cache"):
        TextEmbeddingCache.load(tmp_path / "other", small_encoder)


def test_load_or_build_rebuilds_a_cache_of_another_format_version(small_encoder, cache_path):
    cache_path.mkdir()
    (cache_path / MANIFEST).write_text('{"format": "ldm-text-embedding-cache/0", "fingerprint": "x", "parts": [1]}')
    cache = TextEmbeddingCache.load_or_build(cache_path, small_encoder, CAPTIONS)
    assert TextEmbeddingCache.load(cache_path, small_encoder).captions == cache.captions


def test_load_or_build_decides_staleness_from_the_manifest_alone(small_encoder, cache_path, monkeypatch):
    TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    other = TextEncoder.from_config(TextEncoderConfig(seed=1))
    opened = []
    monkeypatch.setattr(TextEmbeddingCache, "_open", classmethod(lambda cls, path: opened.append(path)))
    monkeypatch.setattr(TextEmbeddingCache, "build", classmethod(lambda cls, *args: "rebuilt"))
    assert TextEmbeddingCache.load_or_build(cache_path, other, CAPTIONS) == "rebuilt" and not opened


def test_build_split_over_ranks_gives_the_single_process_cache(small_encoder, tmp_path):
    captions = [f"caption number {i}" for i in range(11)]
    single = TextEmbeddingCache.build(small_encoder, captions, tmp_path / "one", part_size=3)

    # Two ranks run one after the other here: rank 1 stops at its first barrier, where a launch would wait.
    class Waiting(Exception):
        pass

    def barrier():
        raise Waiting

    with pytest.raises(Waiting):
        TextEmbeddingCache.build(
            small_encoder, captions, tmp_path / "two", part_size=3, rank=1, world_size=2, barrier=barrier
        )
    assert not (tmp_path / "two" / MANIFEST).exists()  # rank 1 wrote parts 1 and 3, rank 0 has yet to write
    assert sorted(p.name for p in (tmp_path / "two").glob("part-*")) == [
        "part-00001.safetensors",
        "part-00003.safetensors",
    ]
    split = TextEmbeddingCache.build(small_encoder, captions, tmp_path / "two", part_size=3, rank=0, world_size=2)
    assert split.captions == single.captions and len(split) == 12
    assert torch.equal(split.encode(captions), single.encode(captions))


def test_an_interrupted_build_resumes_from_its_finished_parts(small_encoder, tmp_path, monkeypatch):
    captions = [f"caption number {i}" for i in range(11)]
    folder = tmp_path / "cache"
    calls = []
    original = TextEncoder.__call__

    def failing_after_two_parts(self, texts):
        calls.append(texts)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while the third part is encoded
        return original(self, texts)

    monkeypatch.setattr(TextEncoder, "__call__", failing_after_two_parts)
    with pytest.raises(KeyboardInterrupt):
        TextEmbeddingCache.build(small_encoder, captions, folder, part_size=3)
    assert [p.name for p in sorted(folder.glob("part-*"))] == ["part-00000.safetensors", "part-00001.safetensors"]
    finished = part_path(folder, 0).stat().st_mtime_ns
    calls.clear()
    cache = TextEmbeddingCache.load_or_build(folder, small_encoder, captions, part_size=3)
    assert len(calls) == 2  # parts 2 and 3 only
    assert part_path(folder, 0).stat().st_mtime_ns == finished and len(cache) == 12


def test_lookups_read_rows_from_disk_not_memory(small_encoder, cache_path):
    cache = TextEmbeddingCache.build(small_encoder, CAPTIONS, cache_path)
    # Nothing of the cache's tensors is held by the object: the only tensors it owns are per lookup.
    assert not [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    assert not [v for v in vars(cache.store).values() if isinstance(v, torch.Tensor)]
    first = cache.encode(["a red bicycle"])
    with torch.no_grad():
        first.zero_()  # a lookup is a fresh tensor: changing it changes nothing cached
    torch.testing.assert_close(
        cache.encode(["a red bicycle"]), small_encoder.encode(["a red bicycle"]), rtol=1e-5, atol=1e-5
    )
