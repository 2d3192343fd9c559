"""A safetensors cache of caption embeddings, so stage 2 looks them up instead of running the encoder.

With a frozen encoder a caption's embedding never changes, so a dataset's captions are encoded once
(deduplicated, with "" for classifier-free guidance always included) and saved together with the
encoder's fingerprint (weights, config, tokenizer, layer choice). Loading checks the fingerprint, so
a cache made by a different encoder is never used silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conditioning.cache_file import cache_file_fingerprint, read_cache_file, write_cache_file
from conditioning.text_encoder import TextEmbeddings, TextEncoder
from conditioning.tokenizer import validate_prompts

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-text-embedding-cache/1"


class TextEmbeddingCache:
    """Embeddings of a fixed set of captions, looked up by caption; a drop-in for `TextEncoder.encode`."""

    def __init__(self, captions: Sequence[str], hidden_states: torch.Tensor, pooled: torch.Tensor, fingerprint: str):
        if not hidden_states.shape[0] == pooled.shape[0] == len(captions):
            raise ValueError(
                f"captions: {len(captions)} captions but {hidden_states.shape[0]} hidden states "
                f"and {pooled.shape[0]} pooled embeddings"
            )
        self.captions = list(captions)
        self.hidden_states = hidden_states  # (N, L, D)
        self.pooled = pooled  # (N, D)
        self.fingerprint = fingerprint
        self._index = {caption: i for i, caption in enumerate(self.captions)}
        if len(self._index) != len(self.captions):
            raise ValueError("captions: contains duplicates; a cache holds each caption once")

    @classmethod
    def build(
        cls,
        encoder: TextEncoder,
        captions: Iterable[str],
        path: str | Path,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
    ) -> TextEmbeddingCache:
        """Encode the distinct captions (plus "") with a frozen `encoder` and save them to `path`.

        `dtype` (e.g. torch.float16) stores the embeddings narrower than the encoder computes them.
        """
        if not encoder.frozen:
            raise ValueError(
                "encoder: is trainable (frozen=False); its embeddings change every step, so they cannot be cached"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        unique = list(dict.fromkeys(["", *validate_prompts(list(captions), name="captions")]))
        # Filled in place: concatenating per-batch pieces would briefly hold the whole cache twice.
        hidden = torch.empty(len(unique), encoder.max_length, encoder.hidden_size, dtype=dtype or encoder.model.dtype)
        pooled: torch.Tensor | None = None  # (N, D') once the first batch shows the pooled width
        with torch.no_grad():
            for start in tqdm(range(0, len(unique), batch_size), desc="encoding captions", unit="batch"):
                out = encoder(unique[start : start + batch_size])
                if pooled is None:
                    pooled = torch.empty(len(unique), out.pooled.shape[-1], dtype=hidden.dtype)
                end = start + len(out.pooled)
                hidden[start:end], pooled[start:end] = out.hidden_states.cpu(), out.pooled.cpu()
        cache = cls(unique, hidden, pooled, encoder.fingerprint())
        cache.save(path)
        logger.info("cached %d distinct captions in %s", len(unique), path)
        return cache

    @classmethod
    def load(cls, path: str | Path, encoder: TextEncoder) -> TextEmbeddingCache:
        """Read a cache and check it was made by `encoder`; a mismatch is a ValueError naming both fingerprints."""
        cache = cls._read(path)
        expected = encoder.fingerprint()
        if cache.fingerprint != expected:
            raise ValueError(
                f"{path}: stale text-embedding cache: built by encoder {cache.fingerprint[:16]}, but this encoder "
                f"is {expected[:16]} (weights, config, tokenizer or clip_skip changed); rebuild it with "
                "TextEmbeddingCache.build or use TextEmbeddingCache.load_or_build"
            )
        return cache

    @classmethod
    def load_or_build(
        cls, path: str | Path, encoder: TextEncoder, captions: Iterable[str], batch_size: int = 64
    ) -> TextEmbeddingCache:
        """The cache at `path` if it was made by `encoder` and holds every caption; otherwise rebuild it."""
        captions = validate_prompts(list(captions), name="captions")
        # The header alone says whether the cache is stale, so a stale cache's tensors are never read.
        if cache_file_fingerprint(path, CACHE_FORMAT) == encoder.fingerprint():
            cache = cls._read(path)
            missing = sum(c not in cache for c in set(captions))
            if not missing:
                return cache
            logger.info("%s: %d captions are not cached; rebuilding", path, missing)
        elif Path(path).is_file():
            logger.info("%s: made by a different text encoder (or an older cache format); rebuilding", path)
        return cls.build(encoder, captions, path, batch_size)

    def save(self, path: str | Path) -> None:
        """Write the cache as one safetensors file (written to a temp name, then renamed, so never half-written)."""
        tensors = {"hidden_states": self.hidden_states, "pooled": self.pooled}
        extra = {"num_captions": str(len(self))}
        write_cache_file(path, tensors, self.captions, CACHE_FORMAT, self.fingerprint, extra)

    @classmethod
    def _read(cls, path: str | Path) -> TextEmbeddingCache:
        remedy = "build one with TextEmbeddingCache.build"
        file = read_cache_file(path, CACHE_FORMAT, "text-embedding cache", remedy)
        return cls(file.strings, file.tensors["hidden_states"], file.tensors["pooled"], file.fingerprint)

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, caption: object) -> bool:
        return caption in self._index

    @property
    def hidden_size(self) -> int:
        """D, the width of every token state."""
        return self.hidden_states.shape[-1]

    @property
    def max_length(self) -> int:
        """L, the number of token states per caption."""
        return self.hidden_states.shape[1]

    def to(self, device: torch.device | str) -> TextEmbeddingCache:
        """Move the embeddings (e.g. to the GPU once, so lookups are a gather there); returns self."""
        self.hidden_states = self.hidden_states.to(device)
        self.pooled = self.pooled.to(device)
        return self

    def _rows(self, captions: str | Sequence[str]) -> torch.Tensor:
        rows = []
        for caption in validate_prompts(captions, name="captions"):
            row = self._index.get(caption)
            if row is None:
                raise KeyError(
                    f"captions: {caption[:80]!r} is not in the text-embedding cache ({len(self)} captions); "
                    "rebuild it with every caption of the dataset (TextEmbeddingCache.load_or_build)"
                )
            rows.append(row)
        return torch.tensor(rows, device=self.hidden_states.device)

    def __call__(self, captions: str | Sequence[str]) -> TextEmbeddings:
        """Look up hidden states (B, L, D) and pooled embeddings (B, D), like calling the encoder."""
        rows = self._rows(captions)
        return TextEmbeddings(self.hidden_states[rows], self.pooled[rows])

    def encode(self, captions: str | Sequence[str]) -> torch.Tensor:
        """Look up the (B, L, D) hidden states of cached captions; an uncached caption is a KeyError."""
        return self.hidden_states[self._rows(captions)]

    def unconditional(self, batch_size: int = 1) -> torch.Tensor:
        """The cached embedding of "" repeated to (batch_size, L, D)."""
        return self.encode([""]).expand(batch_size, -1, -1)
