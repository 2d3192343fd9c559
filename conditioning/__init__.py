"""The text side: the CLIP tokenizer and text encoder that condition the U-Net.

Example::

    encoder = TextEncoder.from_config(TextEncoderConfig())             # or TextEncoderConfig(pretrained="path/to/sd")
    context = encoder.encode(drop_captions(captions, 0.1, generator))   # (B, 77, D) cross-attention context
    cache = TextEmbeddingCache.load_or_build("cache/captions", encoder, captions)  # a folder; then cache.encode(...)
"""

from conditioning.cache import TextEmbeddingCache
from conditioning.config import TextEncoderConfig
from conditioning.guidance import drop_captions
from conditioning.text_encoder import TextEmbeddings, TextEncoder
from conditioning.tokenizer import TokenizedPrompts, build_clip_tokenizer, clean_prompt, tokenize

__all__ = [
    "TextEmbeddingCache",
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderConfig",
    "TokenizedPrompts",
    "build_clip_tokenizer",
    "clean_prompt",
    "drop_captions",
    "tokenize",
]
