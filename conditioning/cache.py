"""A cache of caption embeddings, so stage 2 looks them up instead of running the encoder.

With a frozen encoder a caption's embedding never changes, so a dataset's captions are encoded once
(deduplicated, with "" for classifier-free guidance always included) and saved with the encoder's
fingerprint (weights, config, tokenizer, layer choice). Loading checks the fingerprint, so a cache made by
a different encoder is never used silently.

The cache is a `conditioning.sharded_cache` folder: every rank of a launch encodes its share of the
captions in resumable parts, and lookups read the rows they need from disk, so neither a process's
memory nor a device holds the whole cache (SD-1.x's 77 x 768 embeddings are 118 KB a caption in fp16).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from conditioning.sharded_cache import ShardedCache, build_sharded, no_barrier, num_parts_for, read_manifest
from conditioning.text_encoder import TextEmbeddings, TextEncoder
from conditioning.tokenizer import validate_prompts

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-text-embedding-cache/2"
PART_SIZE = 4096  # captions per part file: about 0.5 GB of SD-1.x embeddings in fp16


class TextEmbeddingCache:
    """Embeddings of a fixed set of captions, looked up by caption; a drop-in for `TextEncoder.encode`.

    Lookups return CPU tensors read from the cache folder (move them with the batch they belong to).
    """

    def __init__(self, store: ShardedCache) -> None:
        self.store = store
        self.fingerprint = store.fingerprint
        self._index = {caption: i for i, caption in enumerate(store.strings)}
        if len(self._index) != len(store):
            raise ValueError(f"{store.folder}: holds duplicate captions; a cache holds each caption once")

    @property
    def captions(self) -> list[str]:
        """The cached captions, in row order ("" first)."""
        return self.store.strings

    @classmethod
    def build(
        cls,
        encoder: TextEncoder,
        captions: Iterable[str],
        folder: str | Path,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        part_size: int = PART_SIZE,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_barrier,
    ) -> TextEmbeddingCache:
        """Encode the distinct captions (plus "") with a frozen `encoder` into the cache folder `folder`.

        Under a launch every rank calls this with its `rank`, the `world_size` and a `barrier` (e.g.
        `accelerator.wait_for_everyone`): each encodes every world_size-th part. `dtype` (e.g.
        torch.float16) stores the embeddings narrower than the encoder computes them.
        """
        if not encoder.frozen:
            raise ValueError(
                "encoder: is trainable (frozen=False); its embeddings change every step, so they cannot be cached"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        unique = list(dict.fromkeys(["", *validate_prompts(list(captions), name="captions")]))
        num_parts = num_parts_for(len(unique), part_size)
        content = _digest(unique, dtype)

        def encode_part(part: int) -> tuple[dict[str, torch.Tensor], list[str]]:
            texts = unique[part * part_size : (part + 1) * part_size]
            hidden, pooled = [], []
            with torch.no_grad():
                for start in range(0, len(texts), batch_size):
                    out = encoder(texts[start : start + batch_size])
                    hidden.append(out.hidden_states.to("cpu", dtype or out.hidden_states.dtype))
                    pooled.append(out.pooled.to("cpu", dtype or out.pooled.dtype))
            return {"hidden_states": torch.cat(hidden), "pooled": torch.cat(pooled)}, texts

        fingerprint, launch = encoder.fingerprint(), (rank, world_size, barrier)
        build_sharded(folder, CACHE_FORMAT, fingerprint, num_parts, encode_part, content, *launch, "encoding captions")
        logger.info("cached %d distinct captions in %s (%d parts)", len(unique), folder, num_parts)
        return cls._open(folder)

    @classmethod
    def load(cls, folder: str | Path, encoder: TextEncoder) -> TextEmbeddingCache:
        """Open a cache and check it was made by `encoder`; a mismatch is a ValueError naming both fingerprints."""
        cache = cls._open(folder)
        expected = encoder.fingerprint()
        if cache.fingerprint != expected:
            raise ValueError(
                f"{folder}: stale text-embedding cache: built by encoder {cache.fingerprint[:16]}, but this encoder "
                f"is {expected[:16]} (weights, config, tokenizer or clip_skip changed); rebuild it with "
                "TextEmbeddingCache.build or use TextEmbeddingCache.load_or_build"
            )
        return cache

    @classmethod
    def load_or_build(
        cls,
        folder: str | Path,
        encoder: TextEncoder,
        captions: Iterable[str],
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        part_size: int = PART_SIZE,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_barrier,
    ) -> TextEmbeddingCache:
        """The cache at `folder` if it was made by `encoder` and holds every caption; otherwise (re)build it.

        Every rank decides alike (from the same files), so under a launch all of them call `build` or none.
        """
        captions = validate_prompts(list(captions), name="captions")
        # The manifest alone says whether the cache is stale, so a stale cache's parts are never read.
        manifest = read_manifest(folder, CACHE_FORMAT)
        if manifest is not None and manifest["fingerprint"] == encoder.fingerprint():
            cache = cls._open(folder)
            missing = sum(c not in cache for c in set(captions))
            if not missing:
                return cache
            logger.info("%s: %d captions are not cached; rebuilding", folder, missing)
        elif Path(folder).exists():
            logger.info("%s: made by a different text encoder, an older format or unfinished; rebuilding", folder)
        return cls.build(encoder, captions, folder, batch_size, dtype, part_size, rank, world_size, barrier)

    @classmethod
    def _open(cls, folder: str | Path) -> TextEmbeddingCache:
        store = ShardedCache(folder, CACHE_FORMAT, "text-embedding cache", "build one with TextEmbeddingCache.build")
        return cls(store)

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, caption: object) -> bool:
        return caption in self._index

    @property
    def hidden_size(self) -> int:
        """D, the width of every token state."""
        return self.store.row_shape("hidden_states")[-1]

    @property
    def max_length(self) -> int:
        """L, the number of token states per caption."""
        return self.store.row_shape("hidden_states")[0]

    def rows(self, captions: str | Sequence[str]) -> list[int]:
        """The cache rows of `captions`; an uncached caption is a KeyError naming it."""
        rows = []
        for caption in validate_prompts(captions, name="captions"):
            row = self._index.get(caption)
            if row is None:
                raise KeyError(
                    f"captions: {caption[:80]!r} is not in the text-embedding cache ({len(self)} captions); "
                    "rebuild it with every caption of the dataset (TextEmbeddingCache.load_or_build)"
                )
            rows.append(row)
        return rows

    def __call__(self, captions: str | Sequence[str]) -> TextEmbeddings:
        """Look up hidden states (B, L, D) and pooled embeddings (B, D), like calling the encoder."""
        rows = self.rows(captions)
        return TextEmbeddings(self.store.rows("hidden_states", rows), self.store.rows("pooled", rows))

    def encode(self, captions: str | Sequence[str]) -> torch.Tensor:
        """Look up the (B, L, D) hidden states of cached captions; an uncached caption is a KeyError."""
        return self.store.rows("hidden_states", self.rows(captions))

    def unconditional(self, batch_size: int = 1) -> torch.Tensor:
        """The cached embedding of "" repeated to (batch_size, L, D)."""
        return self.encode([""]).expand(batch_size, -1, -1)


def _digest(captions: list[str], dtype: torch.dtype | None) -> str:
    """What the rows are made from beyond the encoder: the caption list and the storage dtype."""
    return hashlib.sha256(json.dumps([str(dtype), captions], ensure_ascii=False).encode()).hexdigest()[:16]
