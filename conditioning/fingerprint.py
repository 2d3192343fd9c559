"""Content fingerprints: hashes that change whenever what a frozen module computes could change.

`hash_weights` is the one way a module's weights are hashed; `weights_fingerprint` (the VAE behind the
latent cache) and `text_encoder_fingerprint` (the text-embedding cache) both build on it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Bump when the way prompts become embeddings changes in code (cleaning, truncation, layer choice).
ENCODING_VERSION = 1


def hash_weights(module: nn.Module, digest: Any) -> None:
    """Feed every parameter and buffer of `module` (name, dtype, shape, raw bytes) into `digest`."""
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Hash the raw bytes through a uint8 view: bfloat16 has no numpy equivalent.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_fingerprint(module: nn.Module, extra: Any = None) -> str:
    """sha256 over `extra` (as sorted-key JSON; e.g. the data settings) followed by `hash_weights(module)`."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    hash_weights(module, digest)
    return digest.hexdigest()


def config_identity(config: PretrainedConfig) -> dict[str, Any]:
    """The model config without fields that do not change the computation (paths, library version)."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if not k.startswith("_") and k not in {"transformers_version", "architectures"}
    }


def text_encoder_fingerprint(
    model: nn.Module, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any]
) -> str:
    """sha256 over encoder weights, model config, tokenizer (vocab, merges, normalizer) and encoding settings."""
    digest = hashlib.sha256()
    identity = {
        "encoding_version": ENCODING_VERSION,
        "model_config": config_identity(config),
        "settings": settings,
        "pad_token": tokenizer.pad_token,
    }
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())  # vocab, merges, normalizer, pre-tokenizer
    hash_weights(model, digest)
    return digest.hexdigest()
