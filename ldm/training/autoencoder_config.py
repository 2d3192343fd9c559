"""The typed config of a stage-1 run: the autoencoder (model, loss), its training and its data.
Defaults are the CPU quickstart's (configs/autoencoder_shapes_cpu.yaml equals them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoencoder.config import LossConfig, ModelConfig
from ldm.data import DataConfig
from ldm.training.config import TrainConfig


@dataclass
class AutoencoderTrainConfig(TrainConfig):
    """The shared `train:` section with stage 1's defaults, plus the discriminator's LR and the final evaluation."""

    steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    adam_betas: tuple[float, float] = (0.5, 0.9)  # CompVis' GAN-friendly betas, for both optimizers
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine ends at lr / 10
    disc_lr: float = 2e-4
    eval_samples: int = 1000  # held-out images for the final metrics
    scale_samples: int = 512  # images whose latents set the scaling factor

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.disc_lr <= 0:
            raise ValueError(f"disc_lr: must be positive, got {self.disc_lr}")
        if self.eval_samples < 1 or self.scale_samples < 1:
            raise ValueError("eval_samples and scale_samples: must be at least 1")


@dataclass
class AutoencoderExperimentConfig:
    """A whole stage-1 run: the autoencoder's `model:` and `loss:`, its `train:` and its `data:`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.data.source == "latents":
            raise ValueError("data.source: 'latents' are stage 2's input; the autoencoder trains on images")
        if self.data.buckets:  # a convolutional autoencoder learns all it needs from square crops
            raise ValueError("data.buckets: stage 2 only; the autoencoder trains on square crops (set it false)")
        # Checked when the config is read: the decoder of an f-times downsampling VAE returns sides that are
        # multiples of f, so any other resolution would only fail at the first loss, after start-up.
        levels = len(self.model.block_out_channels)
        factor, where = self.model.downsampling_factor, f"model.block_out_channels has {levels} levels"
        if self.model.pretrained is not None:  # then the folder's own config decides (None: a hub id)
            from ldm.generation.model_folder import vae_downsampling_factor

            factor, where = vae_downsampling_factor(self.model.pretrained), f"model.pretrained {self.model.pretrained}"
        if factor is not None and self.data.resolution % factor:
            raise ValueError(
                f"data.resolution: {self.data.resolution} is not a multiple of the autoencoder's downsampling "
                f"factor f={factor} ({where}); use a multiple of {factor}"
            )
