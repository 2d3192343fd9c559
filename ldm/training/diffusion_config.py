"""The typed config of a stage-2 run: data, the frozen autoencoder and text encoder, the U-Net, the noise
process, the loss, the optimization and the validation samples. Defaults are the CPU quickstart's."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from conditioning import TextEncoderConfig
from ldm.data import DataConfig
from ldm.diffusion.losses import MIN_SNR_OF
from ldm.diffusion.timesteps import TIMESTEP_SAMPLINGS
from ldm.generation.model_folder import (
    SCHEDULER_CONFIG,
    SamplingDefaults,
    read_scheduler_config,
    vae_downsampling_factor,
)
from ldm.generation.noise_schedule import NoiseScheduleConfig
from ldm.training.config import TrainConfig
from ldm.training.contrastive_text import TextPretrainingConfig
from ldm.unet import UNetConfig

logger = logging.getLogger(__name__)

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
    # What the cap applies to (ldm.diffusion.losses.min_snr_weight): "snr" (Hang et al.) or "snr_plus_one"
    # (high-noise steps keep weight 1 in x0 terms instead of about SNR).
    min_snr_of: str = "snr"
    vlb_weight: float = 0.001
    # The distribution of training timesteps (ldm.diffusion.timesteps): uniform, or logit_normal with the
    # mean and std of its logit (> 0 mean: more high-noise steps).
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma: must be positive (or null), got {self.min_snr_gamma}")
        if self.min_snr_of not in MIN_SNR_OF:
            raise ValueError(f"min_snr_of: unknown {self.min_snr_of!r}; valid: {', '.join(MIN_SNR_OF)}")
        if self.vlb_weight < 0:
            raise ValueError(f"vlb_weight: must be >= 0, got {self.vlb_weight}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"timestep_sampling: unknown {self.timestep_sampling!r}; valid: {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        if self.logit_std <= 0:
            raise ValueError(f"logit_std: must be positive, got {self.logit_std}")


@dataclass
class DiffusionTrainConfig(TrainConfig):
    """The shared `train:` section with stage 2's defaults, plus AdamW's weight decay, EMA, memory and caches."""

    steps: int = 1650
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine ends at 0
    grad_clip: float | None = 1.0
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # 0 = no EMA (sampling uses the raw weights)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the U-Net
    cache_latents: bool = True  # encode the dataset once (VAE moments + text embeddings); fixed datasets only
    cache_dir: str | None = None  # where the caches live; null = OUTPUT_DIR/cache

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class ValidationConfig(SamplingDefaults):
    """The sample grid written every `train.sample_every` steps and at the end (fixed prompts and seed). Its
    sampling settings are the model folder's `SamplingDefaults`: the exported model recommends them."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    images_per_prompt: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ValueError("prompts: needs at least one prompt")
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt: must be >= 1, got {self.images_per_prompt}")

    def sampling_defaults(self) -> SamplingDefaults:
        """The sampling settings alone, as the model folder records them."""
        return SamplingDefaults(**{f.name: getattr(self, f.name) for f in fields(SamplingDefaults)})


def _cpu_validation() -> ValidationConfig:
    # w = 4 follows the prompt best on the quickstart model (docs/prompt_adherence.md); SD's 7.5 oversaturates it.
    return ValidationConfig(guidance_scale=4.0)


def _cpu_text_encoder() -> TextEncoderConfig:
    # Shapes captions are under 20 tokens; 32 positions keep the cross-attention context small on a CPU.
    # Trained with the U-Net (as LDM trains its text transformer from scratch), but in its own parameter group:
    # at the U-Net's lr 1e-3 and cosine the encoder grew the features the U-Net uses first (colour, background)
    # and let position's collapse; at 2e-4, constant and without weight decay it keeps every attribute apart.
    # The token table trains only the rows the captions use (docs/prompt_adherence.md has the ablation).
    return TextEncoderConfig(
        max_length=32,
        frozen=False,
        train_token_embedding=True,
        token_rows="captions",
        lr=2e-4,
        lr_schedule="constant",
        weight_decay=0.0,
    )


def _cpu_noise() -> NoiseScheduleConfig:
    # v-prediction on a zero-terminal-SNR schedule, sampled from its last step: an eps model barely needs the
    # text (at high noise its loss hardly sees the image it implies, at lower noise x_t shows the answer), so
    # within the quickstart's budget it never learned to follow prompts (docs/prompt_adherence.md).
    return NoiseScheduleConfig(prediction="v", zero_terminal_snr=True, timestep_spacing="trailing")


def _cpu_loss() -> DiffusionLossConfig:
    # Min-SNR's cap on the low-noise steps, with the high-noise steps, where the layout is decided, kept at
    # weight 1, and drawn more often (logit-normal timesteps of mean 0.5) (docs/prompt_adherence.md).
    return DiffusionLossConfig(
        min_snr_gamma=5.0, min_snr_of="snr_plus_one", timestep_sampling="logit_normal", logit_mean=0.5
    )


@dataclass
class DiffusionExperimentConfig:
    """A whole stage-2 run. `autoencoder` is a diffusers AutoencoderKL folder (stage 1's OUTPUT_DIR/vae,
    or any folder or hub id with a `vae/` subfolder, such as a Stable Diffusion pipeline)."""

    autoencoder: str = "runs/autoencoder/vae"
    autoencoder_variant: str | None = None  # weights variant of `autoencoder`, e.g. "fp16"
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=_cpu_text_encoder)
    text_pretraining: TextPretrainingConfig = field(default_factory=TextPretrainingConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseScheduleConfig = field(default_factory=_cpu_noise)
    loss: DiffusionLossConfig = field(default_factory=_cpu_loss)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    validation: ValidationConfig = field(default_factory=_cpu_validation)

    def __post_init__(self) -> None:
        if not self.autoencoder.strip():
            raise ValueError("autoencoder: give the folder of a trained VAE (e.g. runs/autoencoder/vae)")
        # Checked here, when the config is read, so an impossible size fails before any model is built.
        factor = vae_downsampling_factor(self.autoencoder)  # None: a hub id or a VAE not trained yet
        if factor is not None:
            latent_grid(self.data.resolution, factor, self.unet, where=f"autoencoder {self.autoencoder}")
        elif self.unet.pretrained is None and self.data.resolution % self.unet.downsampling_factor:
            raise ValueError(
                f"data.resolution: {self.data.resolution} is not a multiple of the U-Net's downsampling factor "
                f"{self.unet.downsampling_factor} ({len(self.unet.block_out_channels)} levels), so no VAE could "
                "give it a latent grid it can halve"
            )
        if self.unet.lora is not None and not self.text_encoder.frozen:
            raise ValueError(
                "unet.lora: trains an adapter on a frozen U-Net, but text_encoder.frozen is false, which trains the "
                "whole text encoder beside it: its weights would be in neither the adapter-only checkpoints nor the "
                "adapter file. Set text_encoder.frozen: true (or drop unet.lora for full fine-tuning)"
            )
        if self.text_pretraining.steps and self.text_encoder.frozen:
            raise ValueError(
                "text_pretraining.steps: pre-trains the text encoder, but text_encoder.frozen is true (its embeddings "
                "are cached before stage 2 and would no longer match); set text_encoder.frozen: false"
            )
        if self.unet.pretrained:
            warn_if_noise_differs(self.noise, self.unet.pretrained)


def warn_if_noise_differs(noise: NoiseScheduleConfig, pretrained: str) -> None:
    """Log the `noise` keys that differ from the scheduler config of the pretrained folder: fine-tuning with
    another schedule or prediction is possible (SD 2's 768-v model was fine-tuned from eps to v), but is more
    often a config copied from elsewhere, and the exported folder samples with `noise`."""
    path = Path(pretrained) / SCHEDULER_CONFIG
    if not path.is_file():  # a hub id, or a bare U-Net folder
        return
    theirs, ours = asdict(read_scheduler_config(pretrained)), asdict(noise)
    differing = [f"noise.{k}: {ours[k]!r} (the folder's: {theirs[k]!r})" for k in ours if ours[k] != theirs[k]]
    if differing:
        logger.warning("fine-tuning %s with another noise process than its own: %s", pretrained, "; ".join(differing))


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
