"""The typed config of a stage-2 run: data, the frozen autoencoder and text encoder, the U-Net, the noise
process, the loss, the optimization and the validation samples. Defaults are the CPU quickstart's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conditioning import TextEncoderConfig
from ldm.data import DataConfig
from ldm.noise_schedule import NoiseScheduleConfig
from ldm.unet import UNetConfig

DEFAULT_VALIDATION_PROMPTS = [
    "a red circle on a white background",
    "a blue square on a yellow background",
    "a green triangle on a black background",
    "a yellow circle on a purple background",
    "a white square on a red background",
    "a purple triangle on an orange background",
    "an orange square on a blue background",
    "a black circle on a green background",
]


@dataclass
class DiffusionLossConfig:
    """The training objective: L_simple on the network's target, optionally min-SNR-gamma weighted;
    with a learned variance (noise.variance = learned_range) + vlb_weight * L_vlb (improved DDPM's L_hybrid)."""

    # Hang et al. 2023 (about 3x faster convergence): caps the weight of low-noise steps, leaving more to the
    # high-noise ones where layout and colours are decided. None = unweighted L_simple.
    min_snr_gamma: float | None = 5.0
    vlb_weight: float = 0.001

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma: must be positive (or null), got {self.min_snr_gamma}")
        if self.vlb_weight < 0:
            raise ValueError(f"vlb_weight: must be >= 0, got {self.vlb_weight}")


@dataclass
class DiffusionTrainConfig:
    """Optimization (AdamW, warmup + cosine LR, clipping, EMA), precision, caching and how often to log."""

    seed: int = 0
    steps: int = 1800  # optimizer steps (each one is grad_accum micro-batches)
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: from lr down to 0 at the last step
    grad_clip: float | None = 1.0  # max global grad norm; null = no clipping
    ema_decay: float = 0.999  # 0 = no EMA (sampling uses the raw weights)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the U-Net
    cache_latents: bool = True  # encode the dataset once (VAE moments + text embeddings); fixed datasets only
    cache_dir: str | None = None  # where the caches live; null = OUTPUT_DIR/cache
    num_workers: int = 0
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    log_every: int = 25
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the newest complete checkpoints kept; older ones go once a new one is complete
    max_nonfinite_steps: int = 10  # steps in a row with a NaN/inf loss or gradient (updates skipped) before stopping

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every")
        positive += ("keep_checkpoints", "max_nonfinite_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr: must be positive; weight_decay: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas: each must be in [0, 1), got {list(self.adam_betas)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be positive (or null for none), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.num_threads < 0:
            raise ValueError("warmup_steps, num_workers and num_threads: must be >= 0")


@dataclass
class ValidationConfig:
    """The sample grid written every `train.sample_every` steps and at the end (fixed prompts and seed),
    and the sampling defaults saved with the model."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    images_per_prompt: int = 4
    seed: int = 0
    guidance_scale: float = 4.0
    num_inference_steps: int = 50
    sampler: Literal["ddim", "ddpm"] = "ddim"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: needs at least one prompt")
        if self.images_per_prompt < 1 or self.num_inference_steps < 1:
            raise ValueError("images_per_prompt, num_inference_steps: must be >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be >= 0 (1 = no guidance), got {self.guidance_scale}")


def _cpu_text_encoder() -> TextEncoderConfig:
    # Shapes captions are under 20 tokens; 32 positions keep the cross-attention context small on a CPU.
    # Trained with the U-Net (as LDM trains its text transformer from scratch): a frozen random encoder
    # cannot tell which colour word names the shape and which the background, and the U-Net learns that
    # binding far more slowly on its own. The random token table stays fixed (AdamW would update all its rows).
    return TextEncoderConfig(max_length=32, frozen=False, train_token_embedding=False)


@dataclass
class DiffusionExperimentConfig:
    """A whole stage-2 run. `autoencoder` is a diffusers AutoencoderKL folder (stage 1's OUTPUT_DIR/vae,
    or any folder or hub id with a `vae/` subfolder, such as a Stable Diffusion pipeline)."""

    autoencoder: str = "runs/autoencoder/vae"
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=_cpu_text_encoder)
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if not self.autoencoder.strip():
            raise ValueError("autoencoder: give the folder of a trained VAE (e.g. runs/autoencoder/vae)")
        # Checked here, when the config is read, so an impossible size fails before any model is built.
        from ldm.model_folder import vae_downsampling_factor

        factor = vae_downsampling_factor(self.autoencoder)  # None: a hub id or a VAE not trained yet
        if factor is not None:
            latent_grid(self.data.resolution, factor, self.unet, where=f"autoencoder {self.autoencoder}")
        elif self.unet.pretrained is None and self.data.resolution % self.unet.downsampling_factor:
            raise ValueError(
                f"data.resolution: {self.data.resolution} is not a multiple of the U-Net's downsampling factor "
                f"{self.unet.downsampling_factor} ({len(self.unet.block_out_channels)} levels), so no VAE could "
                "give it a latent grid it can halve"
            )


def latent_grid(resolution: int, vae_factor: int, unet: UNetConfig, where: str = "the VAE") -> int:
    """The side of the latent grid of `resolution`-pixel images: resolution / f, which must be whole and, for a
    U-Net built from `unet` (not a pretrained one), divisible by its 2^(levels - 1). ValueError otherwise."""
    if resolution % vae_factor:
        raise ValueError(
            f"data.resolution: {resolution} is not a multiple of the downsampling factor f={vae_factor} of "
            f"{where}; use a multiple of {vae_factor}"
        )
    size = resolution // vae_factor
    if unet.pretrained is None and size % unet.downsampling_factor:
        levels, multiple = len(unet.block_out_channels), vae_factor * unet.downsampling_factor
        raise ValueError(
            f"data.resolution: {resolution} gives {size}x{size} latents (f={vae_factor}), which the U-Net's "
            f"{levels} levels cannot halve {levels - 1} times; use a multiple of {multiple}"
        )
    return size
