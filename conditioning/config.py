"""The typed config of the text encoder: where its weights come from and how prompts are encoded."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal

# OpenAI CLIP's context length; Stable Diffusion 1.x/2.x condition on exactly 77 token states.
CLIP_MAX_LENGTH = 77
# The fields that say how an unfrozen encoder trains (null = the `train:` section's value; freeze_after: never).
TRAINING_FIELDS = ("lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "freeze_after")


@dataclass
class TextEncoderConfig:
    """How to build the text encoder, and how prompts become (B, max_length, D) conditioning.

    Either `pretrained` names a Hugging Face folder or hub id (a Stable Diffusion pipeline folder with
    `text_encoder/` and `tokenizer/` subfolders, by default) and the weights are loaded with
    `CLIPTextModel.from_pretrained`, or it is None and a small randomly initialized `CLIPTextModel` is
    built from the `hidden_size` .. `intermediate_size` fields (seeded by `seed`) with the real CLIP
    BPE tokenizer (49,408 tokens, OpenAI's ids). The small-model fields are ignored when `pretrained`
    is set.

    The CPU default (hidden 128, 2 layers, 4 heads) is chosen because: the encoder is frozen by default,
    so on CPU it is a fixed random feature map of the token sequence and a shallow one keeps each
    token's identity (deep random attention stacks drift towards uniform token states); 128 channels
    is the cross-attention context width a small CPU U-Net can afford; and 2 layers encode 64 prompts
    in tens of milliseconds. Its parameters are dominated by the 49,408 x 128 token embedding (6.3 M).
    """

    pretrained: str | None = None  # folder or hub id; None = build the small model below
    text_encoder_subfolder: str = "text_encoder"  # "" when `pretrained` is a bare CLIP folder/id
    tokenizer_subfolder: str = "tokenizer"
    variant: str | None = None  # weights file variant of `pretrained`, e.g. "fp16" for model.fp16.safetensors
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    seed: int = 0  # initializes the small model; pretrained weights ignore it
    max_length: int = CLIP_MAX_LENGTH  # tokens per prompt, BOS and EOS included
    clip_skip: int = 0  # 0 = last layer (SD 1.x); 1 = penultimate layer + final layer norm (diffusers)
    frozen: bool = True  # eval mode, no gradients; False trains the encoder with the U-Net
    # With frozen=False: also train the 49,408-row token table. False keeps its (random or pretrained) rows as
    # fixed token codes and trains the layers above them; a prompt uses ~20 rows, yet AdamW would update all.
    train_token_embedding: bool = True
    # How an unfrozen encoder trains: its own AdamW parameter group in stage 2. null = the `train:` section's value.
    lr: float | None = None
    lr_schedule: Literal["constant", "cosine"] | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    freeze_after: int | None = None  # the step from which its LR is 0 and its weights stop moving; null = never
    # With train_token_embedding: "all" trains the whole table; "captions" only the rows of the tokens the training
    # captions use (AdamW then touches ~50 rows, not 49,408; it needs the captions up front, so not streamed data).
    token_rows: Literal["captions", "all"] = "all"
    p_uncond: float = 0.1  # training-time probability of replacing a caption by "" (for CFG)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def section_defaults(self, section: Mapping[str, Any]) -> dict[str, Any]:
        """This config's values as the defaults a partial `text_encoder:` section is laid over (ldm.config). A
        section naming `pretrained` weights starts from the class's own defaults (frozen, CLIP's 77 tokens), not
        from a small trained encoder's; a section that freezes the encoder keeps none of the default's training
        settings it does not give itself."""
        values = dataclasses.asdict(TextEncoderConfig() if section.get("pretrained") else self)
        if section.get("frozen") is True:
            values |= dict.fromkeys(TRAINING_FIELDS)
        return values

    def __post_init__(self) -> None:
        if self.pretrained is not None and not self.pretrained.strip():
            raise ValueError("pretrained: is empty; give a folder or hub id, or null to build the small encoder")
        for key in ("text_encoder_subfolder", "tokenizer_subfolder"):
            subfolder = PurePath(getattr(self, key))
            if subfolder.is_absolute() or ".." in subfolder.parts:
                raise ValueError(
                    f"{key}: must be a folder inside `pretrained` (relative, without '..'), got {getattr(self, key)!r}"
                )
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "each head needs hidden_size / num_heads channels"
            )
        if not 2 <= self.max_length <= CLIP_MAX_LENGTH:
            raise ValueError(
                f"max_length: must be in [2, {CLIP_MAX_LENGTH}] (BOS + EOS at least; CLIP has "
                f"{CLIP_MAX_LENGTH} positions), got {self.max_length}"
            )
        if self.clip_skip < 0:
            raise ValueError(f"clip_skip: must be >= 0 (0 = last layer), got {self.clip_skip}")
        if self.pretrained is None and self.clip_skip >= self.num_layers:
            raise ValueError(
                f"clip_skip: {self.clip_skip} skips every layer of a {self.num_layers}-layer encoder; "
                f"valid values are 0 .. {self.num_layers - 1}"
            )
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr: must be positive (or null for train.lr), got {self.lr}")
        if self.lr_schedule not in (None, "constant", "cosine"):
            raise ValueError(f"lr_schedule: unknown {self.lr_schedule!r}; valid: constant, cosine (or null)")
        for key in ("warmup_steps", "freeze_after"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0 (or null), got {getattr(self, key)}")
        if self.min_lr_ratio is not None and not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1] (or null), got {self.min_lr_ratio}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0 (or null), got {self.weight_decay}")
        given = [key for key in TRAINING_FIELDS if getattr(self, key) is not None]
        if self.frozen and given:
            raise ValueError(
                f"{', '.join(given)}: set for a frozen encoder, which does not train; set frozen: false to train "
                f"it, or set them to null (--set text_encoder.{'=null --set text_encoder.'.join(given)}=null)"
            )
        if self.token_rows not in ("captions", "all"):
            raise ValueError(f"token_rows: unknown {self.token_rows!r}; valid: captions, all")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond: is a probability, must be in [0, 1], got {self.p_uncond}")
