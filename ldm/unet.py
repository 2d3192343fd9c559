"""The denoising network: a diffusers `UNet2DConditionModel` built from a typed config, or loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import UNet2DConditionModel

# diffusers' train_text_to_image_lora.py adapts the attention projections of every transformer block.
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass
class LoRAConfig:
    """A low-rank adapter on the U-Net (Hu et al. 2021): W x + (alpha / rank) B A x, with A (rank, in) and
    B (out, rank) trained and W frozen. B starts at 0, so training starts from the base model exactly.

    `target_modules` are module names (or name suffixes, as peft matches them) of the linear layers adapted;
    `alpha` None means alpha = rank (scale 1).
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"unet.lora.rank: must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"unet.lora.alpha: must be > 0 (or null for alpha = rank), got {self.alpha}")
        if not self.target_modules or not all(isinstance(m, str) and m.strip() for m in self.target_modules):
            raise ValueError(
                f"unet.lora.target_modules: needs module names, e.g. {list(DEFAULT_LORA_TARGETS)}; "
                f"got {self.target_modules!r}"
            )

    @property
    def resolved_alpha(self) -> float:
        """alpha, with None resolved to the rank."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class UNetConfig:
    """A cross-attention U-Net over latents; `pretrained` (a folder or hub id with `unet/`) overrides the rest.

    One level per entry of `block_out_channels`; each level halves the resolution except the last.
    `cross_attention` says, per level, whether its blocks cross-attend to the text (SD 1.x: all but the
    lowest-resolution level; the middle block always does). `attention_head_dim` is the number of channels
    per head, so wider levels get more heads. The in / out channels and the cross-attention width come
    from the autoencoder, the noise schedule and the text encoder, not from here.
    """

    pretrained: str | None = None
    variant: str | None = None  # weights file variant of `pretrained`, e.g. "fp16" for *.fp16.safetensors
    block_out_channels: tuple[int, ...] = (64, 128)
    cross_attention: tuple[bool, ...] = (True, True)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    transformer_layers_per_block: int = 1
    # Also add the text, attention-pooled, to the timestep embedding (Imagen, DeepFloyd IF; diffusers'
    # addition_embed_type="text"): a global path for what is true of the whole image (colours, shape, size,
    # where the object is), beside the per-position path of cross-attention.
    pooled_text: bool = False
    # Train a low-rank adapter instead of the U-Net's weights (meant for a `pretrained` U-Net; see LoRAConfig).
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        if self.variant is not None and not self.pretrained:
            raise ValueError(f"variant: {self.variant!r} names weight files of `pretrained`, which is not set")
        if not self.block_out_channels:
            raise ValueError("block_out_channels: needs at least one width, e.g. [320, 640, 1280, 1280]")
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(
                f"cross_attention: has {len(self.cross_attention)} entries, needs one per level "
                f"({len(self.block_out_channels)}, like block_out_channels)"
            )
        bad = [c for c in self.block_out_channels if c <= 0 or c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels: {bad} are not positive multiples of norm_num_groups")
        bad = [c for c in self.block_out_channels if c % self.attention_head_dim]
        if bad:
            raise ValueError(f"block_out_channels: {bad} are not multiples of attention_head_dim")
        if self.layers_per_block < 1 or self.transformer_layers_per_block < 1:
            raise ValueError("layers_per_block, transformer_layers_per_block: must be >= 1")

    @property
    def downsampling_factor(self) -> int:
        """How much the U-Net shrinks its input at its lowest level: 2^(levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


def build_unet(
    cfg: UNetConfig, *, in_channels: int, out_channels: int, cross_attention_dim: int, sample_size: int
) -> UNet2DConditionModel:
    """The U-Net `cfg` describes for latents with `in_channels` channels of side `sample_size`.

    `out_channels` is in_channels, or twice that when the noise schedule learns the variance. A
    pretrained U-Net is checked against these sizes, since a mismatch would only fail deep in a forward.
    """
    if cfg.pretrained:
        unet = UNet2DConditionModel.from_pretrained(
            cfg.pretrained, subfolder="unet", use_safetensors=True, variant=cfg.variant
        )
        expected = {"in_channels": in_channels, "out_channels": out_channels}
        expected["cross_attention_dim"] = cross_attention_dim
        wrong = {k: (unet.config[k], v) for k, v in expected.items() if unet.config[k] != v}
        if wrong:
            details = ", ".join(f"{k} is {got}, needs {want}" for k, (got, want) in wrong.items())
            raise ValueError(f"unet.pretrained: {cfg.pretrained}: {details}")
        return unet
    heads = [c // cfg.attention_head_dim for c in cfg.block_out_channels]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(heads),  # diffusers' historical name: this argument is the number of heads
        norm_num_groups=cfg.norm_num_groups,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        **pooled_text_settings(cfg, cross_attention_dim),
    )


def pooled_text_settings(cfg: UNetConfig, cross_attention_dim: int) -> dict[str, object]:
    """diffusers' arguments for `cfg.pooled_text`: its attention pooling uses heads of attention_head_dim
    channels (one head when the text width is not a multiple of it)."""
    if not cfg.pooled_text:
        return {}
    heads = cross_attention_dim // cfg.attention_head_dim if cross_attention_dim % cfg.attention_head_dim == 0 else 1
    return {"addition_embed_type": "text", "addition_embed_type_num_heads": heads}
