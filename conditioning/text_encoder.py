"""The text encoder: prompts -> (B, 77, D) CLIP hidden states that the U-Net cross-attends to."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conditioning.config import TRAINING_FIELDS, TextEncoderConfig
from conditioning.fingerprint import text_encoder_fingerprint
from conditioning.token_rows import CaptionRowEmbedding
from conditioning.tokenizer import (
    VOCAB_SIZE,
    TokenizedPrompts,
    build_clip_tokenizer,
    save_tokenizer,
    token_count,
    tokenize,
    validate_prompts,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TextEmbeddings(NamedTuple):
    """What a prompt batch becomes: per-token states for cross-attention and one pooled vector per prompt."""

    hidden_states: torch.Tensor  # (B, L, D), L = max_length
    pooled: torch.Tensor  # (B, D): the final layer's (layer-normed) state at each prompt's EOS token


class TextEncoder(nn.Module):
    """A CLIP tokenizer + `CLIPTextModel` that turns prompts into conditioning, with CFG helpers.

    `hidden_states` is the final layer norm applied to the output of layer N - clip_skip, exactly as
    diffusers' StableDiffusionPipeline computes it (clip_skip = 0 is `last_hidden_state`). Frozen
    encoders run without autograd, stay in eval mode when a parent module calls `.train()`, and cache
    the unconditional embedding of "".
    """

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, config: TextEncoderConfig) -> None:
        super().__init__()
        num_layers = model.config.num_hidden_layers
        if config.clip_skip >= num_layers:
            raise ValueError(f"clip_skip: {config.clip_skip} is too large for a {num_layers}-layer text encoder")
        if config.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"max_length: {config.max_length} exceeds the encoder's "
                f"{model.config.max_position_embeddings} position embeddings"
            )
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the encoder only {model.config.vocab_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._uncond: torch.Tensor | None = None  # (1, L, D) embedding of "", filled lazily when frozen
        self.set_frozen(config.frozen)

    @classmethod
    def from_config(cls, config: TextEncoderConfig) -> TextEncoder:
        """Load `config.pretrained` with `from_pretrained`, or build the small random CLIP it describes."""
        dtype = _DTYPES[config.dtype]
        if config.pretrained is not None:
            model = CLIPTextModel.from_pretrained(
                config.pretrained,
                subfolder=config.text_encoder_subfolder,
                dtype=dtype,
                use_safetensors=True,
                variant=config.variant,
            )
            tokenizer = CLIPTokenizer.from_pretrained(config.pretrained, subfolder=config.tokenizer_subfolder)
            return cls(model, tokenizer, config)
        model_config = CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            max_position_embeddings=config.max_length,
            projection_dim=config.hidden_size,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(config.seed)
            model = CLIPTextModel(model_config)
        return cls(model.to(dtype), build_clip_tokenizer(config.max_length), config)

    @classmethod
    def from_pretrained(cls, path: str | Path, **settings: object) -> TextEncoder:
        """Load a folder written by `save_pretrained` (or any SD pipeline folder); `settings` are config fields."""
        return cls.from_config(TextEncoderConfig(pretrained=str(path), **settings))  # type: ignore[arg-type]

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `folder/text_encoder/` (config.json + model.safetensors) and `folder/tokenizer/`."""
        # Always the standard names, whatever layout the weights were read from: a model folder has one layout.
        folder = Path(folder)
        self.model.save_pretrained(folder / "text_encoder", safe_serialization=True, state_dict=self.plain_state_dict())
        save_tokenizer(self.tokenizer, folder / "tokenizer")

    def train_caption_rows(self, captions: Sequence[str]) -> int:
        """Train only the token-table rows that `captions` (and "") use: the table becomes a `CaptionRowEmbedding`.
        Returns the number of trainable rows."""
        table = self.model.get_input_embeddings()
        if isinstance(table, CaptionRowEmbedding):
            raise ValueError("train_caption_rows: the token table already trains caption rows only")
        ids = self.tokenize([*captions, ""]).input_ids.flatten()
        rows = CaptionRowEmbedding(table, ids)
        self.model.set_input_embeddings(rows)
        rows.rows.requires_grad_(not self.frozen)
        return rows.rows.shape[0]

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict as a plain `CLIPTextModel` has it (trained caption rows merged into the table)."""
        state = self.model.state_dict()
        table = self.model.get_input_embeddings()
        if isinstance(table, CaptionRowEmbedding):
            prefix = next(name for name, module in self.model.named_modules() if module is table)
            del state[f"{prefix}.rows"]
            state[f"{prefix}.weight"] = table.merged_weight()
        return state

    @property
    def hidden_size(self) -> int:
        """D, the width of every token state (the U-Net's cross-attention dimension)."""
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        """L, the number of token states per prompt."""
        return self.config.max_length

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live."""
        return self.model.device

    @property
    def frozen(self) -> bool:
        """True when the encoder is a fixed function: eval mode and no parameter takes gradients."""
        return self.config.frozen

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (eval mode, requires_grad False) or unfreeze (train mode, requires_grad True) the encoder.

        Unfrozen, the token-embedding table still stays fixed when `config.train_token_embedding` is False, and
        so do the last `clip_skip` layers: their output is never used, so they would get no gradient, which
        DistributedDataParallel rejects as unused parameters.
        """
        # A frozen encoder has no training settings (a config with them is refused), so freezing drops them.
        cleared = dict.fromkeys(TRAINING_FIELDS) if frozen else {}
        self.config = dataclasses.replace(self.config, frozen=frozen, **cleared)
        self.model.requires_grad_(not frozen)
        table = self.model.get_input_embeddings()
        if isinstance(table, CaptionRowEmbedding):
            table.weight.requires_grad_(False)  # only its caption rows ever train
        if not frozen and not self.config.train_token_embedding:
            table.requires_grad_(False)
        if not frozen and self.config.clip_skip > 0:
            for layer in self.model.encoder.layers[-self.config.clip_skip :]:
                layer.requires_grad_(False)
        self.train(not frozen)
        self._uncond = None

    def train(self, mode: bool = True) -> TextEncoder:
        """Like nn.Module.train, but a frozen encoder stays in eval mode (dropout off) whatever the parent says."""
        return super().train(mode and not self.frozen)

    def tokenize(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        """Token ids (B, L) padded with EOS; prompts over L tokens are truncated with a warning."""
        return tokenize(self.tokenizer, prompts, self.max_length)

    def token_count(self, prompt: str) -> int:
        """Tokens `prompt` takes, BOS and EOS included; more than `max_length` are truncated when encoding."""
        return token_count(self.tokenizer, prompt)

    def forward(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        """Encode prompts into hidden states (B, L, D) and pooled embeddings (B, D)."""
        tokens = self.tokenize(prompts)
        input_ids = tokens.input_ids.to(self.device)
        # SD 1.x encoders attend causally over EOS padding without a mask; honour configs that ask for one.
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        attention_mask = tokens.attention_mask.to(self.device) if use_mask else None
        clip_skip = self.config.clip_skip
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=clip_skip > 0)
            hidden = out.last_hidden_state  # (B, L, D) = final_layer_norm(hidden_states[-1])
            if clip_skip > 0:
                # hidden_states = (embeddings, layer 1, ..., layer N); diffusers takes [-(clip_skip + 1)]
                # and applies the final layer norm, so clip_skip = 1 is the penultimate layer.
                hidden = self.model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        return TextEmbeddings(hidden, out.pooler_output)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, L, D) hidden states, the U-Net's cross-attention context."""
        return self(prompts).hidden_states

    def unconditional(self, batch_size: int = 1) -> torch.Tensor:
        """The embedding of "" as a (batch_size, L, D) read-only view; computed once and cached while frozen.

        The cache is dropped by `set_frozen` and when the device or dtype changes; call `set_frozen(True)`
        after loading other weights into a frozen encoder.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
        uncond = self._uncond
        if uncond is None or uncond.device != self.device or uncond.dtype != self.model.dtype:
            uncond = self.encode([""])  # (1, L, D)
            if self.frozen:  # a trainable encoder changes every step, so its "" embedding does too
                self._uncond = uncond
        return uncond.expand(batch_size, -1, -1)

    def encode_negative(self, negative_prompt: str | Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """The guidance baseline (batch_size, L, D): "" when `negative_prompt` is None, else the negative prompt(s).

        A single negative prompt is shared by the batch; a list must have one per prompt. Negative prompts
        use the same layer (clip_skip) as the prompts, because training encoded the dropped captions ""
        that way; diffusers' StableDiffusionPipeline instead encodes them with the last layer always.
        """
        if negative_prompt is None:
            return self.unconditional(batch_size)
        negatives = validate_prompts(negative_prompt, name="negative_prompt")
        if isinstance(negative_prompt, str):
            return self.encode(negatives).expand(batch_size, -1, -1)
        if len(negatives) != batch_size:
            raise ValueError(f"negative_prompt: has {len(negatives)} prompts, expected 1 (a str) or {batch_size}")
        return self.encode(negatives)

    def encode_for_guidance(
        self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) embeddings, each (B, L, D), for eps~ = eps_u + w (eps_c - eps_u)."""
        cond = self.encode(prompts)
        return cond, self.encode_negative(negative_prompt, cond.shape[0])

    def fingerprint(self) -> str:
        """A hash of weights, model config, tokenizer and layer choice: equal fingerprints, equal embeddings."""
        settings = {"clip_skip": self.config.clip_skip, "max_length": self.max_length}
        return text_encoder_fingerprint(self.model, self.model.config, self.tokenizer, settings)
