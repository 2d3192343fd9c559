"""Text to image: `LatentDiffusionPipeline`, our samplers and classifier-free guidance over a diffusers folder.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/quickstart/pipeline")
    images = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0)).images

One call: encode the prompts once, draw x_T ~ N(0, I) exactly as diffusers does, walk the reverse chain
with `ldm.diffusion.sample_ddim` / `sample_ddpm` on the guided U-Net, then decode z_0 / scaling_factor
with the VAE. The folder is a Stable Diffusion pipeline folder (see `ldm.model_folder`), so
`diffusers.StableDiffusionPipeline.from_pretrained` loads it too and, with the same scheduler, steps,
guidance scale and seed, draws the same images (float32 CPU: to ~1e-6 of the latents' scale). Two
deliberate differences from diffusers: guidance 0 <= w < 1 is applied as written (w = 0 samples the
unconditional model) where diffusers switches guidance off for w <= 1; and with `trailing` or `linspace`
timestep spacing each DDIM step goes to the previous timestep of the subset (DESIGN.md), where diffusers'
DDIMScheduler goes to t - T // n, so only the default `leading` spacing draws identical images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError

from conditioning import TextEncoder
from conditioning.config import CLIP_MAX_LENGTH
from conditioning.tokenizer import validate_prompts
from ldm.diffusion import classifier_free_guidance, sample_ddim, sample_ddpm, spaced_timesteps
from ldm.images import to_numpy, to_pil
from ldm.model_folder import (
    SAMPLERS,
    SamplingDefaults,
    check_model_folder,
    read_json,
    read_scheduler_config,
    write_model_index,
    write_scheduler_config,
)
from ldm.noise_schedule import NoiseScheduleConfig

__all__ = ["LatentDiffusionPipeline", "PipelineOutput", "SamplingDefaults", "SamplingSettings"]

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass(frozen=True)
class SamplingSettings:
    """The resolved settings of one pipeline call (see `LatentDiffusionPipeline.resolve_settings`)."""

    guidance_scale: float
    num_inference_steps: int
    sampler: str
    eta: float
    height: int
    width: int

    @property
    def stochastic(self) -> bool:
        """True when the sampler draws noise at every step (DDPM, or DDIM with eta > 0)."""
        return self.sampler == "ddpm" or self.eta > 0


@dataclass
class PipelineOutput:
    """What a pipeline call returns. Images are ordered prompt by prompt: prompt 0's images, then prompt 1's."""

    images: list[Image.Image] | np.ndarray | torch.Tensor  # PIL list | (B, H, W, 3) float32 in [0, 1] | latents
    trajectory: torch.Tensor | None = None  # x_T .. x_0 latents, (steps + 1, B, C, h, w), when asked for
    trajectory_x0: torch.Tensor | None = None  # the x_0 predicted from each x_t, (steps, B, C, h, w)


class LatentDiffusionPipeline:
    """A text-conditioned latent diffusion model: VAE, text encoder, U-Net and the noise process.

    Sampling: z_T ~ N(0, I) of shape (B, C, height / f, width / f) with f the VAE's downsampling factor;
    each step evaluates eps~ = eps_u + w (eps_c - eps_u) in one batched U-Net pass over [uncond; cond]
    (a single conditional pass when w = 1) and applies a DDIM or ancestral DDPM update; finally
    x = D(z_0 / scaling_factor) and images are (x / 2 + 0.5) clamped to [0, 1].
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        unet: UNet2DConditionModel,
        noise_schedule: NoiseScheduleConfig,
        defaults: SamplingDefaults | None = None,
    ) -> None:
        latent_channels = vae.config.latent_channels
        if unet.config.in_channels != latent_channels:
            raise ValueError(
                f"unet: takes {unet.config.in_channels} input channels but the VAE's latents have {latent_channels}"
            )
        out_channels = latent_channels * noise_schedule.output_channels_factor
        if unet.config.out_channels != out_channels:
            raise ValueError(
                f"unet: outputs {unet.config.out_channels} channels; the {noise_schedule.variance} variance "
                f"needs {out_channels} ({latent_channels} latent channels x {noise_schedule.output_channels_factor})"
            )
        if unet.config.cross_attention_dim != text_encoder.hidden_size:
            raise ValueError(
                f"unet: cross_attention_dim is {unet.config.cross_attention_dim} but the text encoder's width is "
                f"{text_encoder.hidden_size}"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.noise_schedule = noise_schedule
        self.diffusion = noise_schedule.build().to(unet.device)
        self.defaults = defaults or SamplingDefaults()

    # ---- sizes ---------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """f = 2^(number of VAE blocks - 1): image pixels per latent pixel along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: f times the U-Net's 2^(down blocks - 1) downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def default_size(self) -> int:
        """The image side the U-Net was built for: its sample_size times f."""
        sample_size = self.unet.config.sample_size
        side = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        return side * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        """Where the U-Net's weights are (the pipeline keeps all parts on one device)."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's dtype, in which latents are drawn and sampled."""
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LatentDiffusionPipeline:
        """Move (and optionally cast) every network, and put the noise schedule's arrays on `device`, so that
        sampling copies nothing from the host; returns self. The schedule keeps float64 (DESIGN.md)."""
        # Only what is given: diffusers warns about casts whenever `dtype` is passed, even as None.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(**kwargs)
        if device is not None:
            self.diffusion.to(device)
        return self

    # ---- the folder ----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model folder (see `ldm.model_folder`): safetensors weights and diffusers configs."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(folder)
        write_scheduler_config(folder, self.noise_schedule)
        self.defaults.save(folder)
        write_model_index(
            folder,
            {
                "vae": ("diffusers", type(self.vae).__name__),
                "unet": ("diffusers", type(self.unet).__name__),
                "text_encoder": ("transformers", type(self.text_encoder.model).__name__),
                "tokenizer": ("transformers", type(self.text_encoder.tokenizer).__name__),
                "scheduler": ("diffusers", self.noise_schedule.to_scheduler_config()["_class_name"]),
            },
        )
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> LatentDiffusionPipeline:
        """Load a model folder (ours or any SD 1.x/2.x folder with safetensors weights).

        A missing folder, model_index.json or component raises FileNotFoundError naming them; a component
        whose files are corrupt (truncated weights, invalid JSON) raises OSError naming it. The text
        encoder uses TextEncoderConfig's defaults (clip_skip 0, frozen); the latent scale is the VAE
        config's scaling_factor.
        """
        folder = check_model_folder(folder)
        dtype_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        with _loading(folder, "vae"):
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, **dtype_kwargs)
        with _loading(folder, "unet"):
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **dtype_kwargs)
        with _loading(folder, "text_encoder"):
            text_encoder = TextEncoder.from_pretrained(folder, max_length=text_positions(folder))
        pipe = cls(vae, text_encoder, unet, read_scheduler_config(folder), SamplingDefaults.load(folder))
        return pipe.to(device, torch_dtype)

    # ---- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: Literal["ddim", "ddpm"] | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: Literal["pil", "np", "latent"] = "pil",
        return_trajectory: bool = False,
        progress: bool = True,
    ) -> PipelineOutput:
        """Generate `num_images_per_prompt` images per prompt.

        None for guidance_scale, num_inference_steps, sampler or eta means the folder's `SamplingDefaults`;
        None for height / width means the U-Net's sample_size times the VAE factor. eta only affects DDIM
        (0 = deterministic). Invalid arguments raise ValueError naming the argument.
        """
        prompts = validate_prompts(prompt, name="prompt")
        if negative_prompt is not None:
            negatives = validate_prompts(negative_prompt, name="negative_prompt")
            if not isinstance(negative_prompt, str) and len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt: has {len(negatives)} prompts for {len(prompts)} prompts; "
                    "give one str for all, or a list with one per prompt"
                )
        s = self.resolve_settings(guidance_scale, num_inference_steps, sampler, eta, height, width)
        self._check_options(num_images_per_prompt, output_type, generator, s.stochastic)

        # Text: (P, L, D) each, repeated per image as diffusers does (prompt 0's images first).
        cond, uncond = self.text_encoder.encode_for_guidance(prompt, negative_prompt)
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0).to(self.device, self.dtype)  # (B, L, D)
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0).to(self.device, self.dtype)  # (B, L, D)

        f = self.vae_scale_factor
        shape = (cond.shape[0], self.unet.config.in_channels, s.height // f, s.width // f)  # (B, C, h, w)
        x_T = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)  # init_noise_sigma = 1
        model = classifier_free_guidance(self._unet_fn, s.guidance_scale, {"encoder_hidden_states": uncond})
        pred_x0: list[torch.Tensor] = []
        common: dict[str, Any] = {
            "num_steps": s.num_inference_steps,
            "spacing": self.noise_schedule.timestep_spacing,
            "steps_offset": self.noise_schedule.steps_offset,
            "model_kwargs": {"encoder_hidden_states": cond},
            "generator": generator,
            "return_trajectory": return_trajectory,
            "callback": (lambda _i, _t, _x, x0: pred_x0.append(x0)) if return_trajectory else None,
            "progress": progress,
        }
        if s.sampler == "ddim":
            result = sample_ddim(model, self.diffusion, x_T, eta=s.eta, **common)
        else:
            result = sample_ddpm(model, self.diffusion, x_T, **common)

        trajectory_x0 = torch.stack(pred_x0) if return_trajectory else None
        if output_type == "latent":
            return PipelineOutput(result.sample, result.trajectory, trajectory_x0)
        images = self.decode(result.sample)
        out = to_pil(images) if output_type == "pil" else to_numpy(images)
        return PipelineOutput(out, result.trajectory, trajectory_x0)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in diffusion scale (B, C, h, w) -> images (B, 3, h f, w f) in [-1, 1] (not clamped):
        x = D(z / scaling_factor)."""
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample

    def _unet_fn(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample

    # ---- argument checks -----------------------------------------------------------------------------

    def resolve_settings(
        self,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> SamplingSettings:
        """The settings a call with these arguments samples with: None -> the folder's defaults (sizes: the
        U-Net's). Raises ValueError naming the first invalid argument."""
        d = self.defaults
        settings = SamplingSettings(
            guidance_scale=d.guidance_scale if guidance_scale is None else _as_float(guidance_scale, "guidance_scale"),
            num_inference_steps=d.num_inference_steps if num_inference_steps is None else num_inference_steps,
            sampler=d.sampler if sampler is None else sampler,
            eta=d.eta if eta is None else _as_float(eta, "eta"),
            height=self.default_size if height is None else height,
            width=self.default_size if width is None else width,
        )
        self._check_settings(settings)
        return settings

    def _check_settings(self, s: SamplingSettings) -> None:
        if s.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale: must be >= 0 (1 = no guidance, 0 = unconditional), got {s.guidance_scale}"
            )
        if s.sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
        if not 0.0 <= s.eta <= 1.0:
            raise ValueError(f"eta: must be in [0, 1], got {s.eta}")
        steps, schedule = s.num_inference_steps, self.noise_schedule
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"num_inference_steps: must be a positive int, got {steps!r}")
        try:  # the steps must fit in the training chain after spacing and steps_offset
            spaced_timesteps(schedule.num_train_timesteps, steps, schedule.timestep_spacing, schedule.steps_offset)
        except ValueError as err:
            raise ValueError(
                f"num_inference_steps: {steps} does not fit the {schedule.num_train_timesteps}-step chain "
                f"({schedule.timestep_spacing} spacing, steps_offset {schedule.steps_offset}): {err}"
            ) from err
        multiple = self.size_multiple
        for name, side in (("height", s.height), ("width", s.width)):
            if not _is_int(side) or side < multiple or side % multiple:
                raise ValueError(
                    f"{name}: must be a positive multiple of {multiple} (VAE factor {self.vae_scale_factor} x "
                    f"U-Net downsampling {multiple // self.vae_scale_factor}), got {side!r}"
                )

    def _check_options(
        self, num_images: int, output_type: str, generator: torch.Generator | None, needs_step_noise: bool
    ) -> None:
        if not _is_int(num_images) or num_images < 1:
            raise ValueError(f"num_images_per_prompt: must be a positive int, got {num_images!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: must be one torch.Generator or None, got {type(generator).__name__}")
        # x_T is drawn on the generator's device and moved (diffusers' randn_tensor); the samplers' step
        # noise is drawn directly on the pipeline's device, which needs a generator there.
        if needs_step_noise and generator is not None and generator.device.type != self.device.type:
            raise ValueError(
                f"generator: is on {generator.device.type} but stochastic sampling (ddpm, or ddim with eta > 0) "
                f"draws its noise on {self.device.type}; pass torch.Generator(device={self.device.type!r})"
            )


def _as_float(value: object, name: str) -> float:
    """`value` as a finite float; anything else (a string, a bool, NaN, infinity) is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_positions(folder: Path) -> int:
    """The prompt length the folder's text encoder was built for: its position embeddings, at most CLIP's 77."""
    config = read_json(folder / "text_encoder" / "config.json")
    return min(int(config.get("max_position_embeddings", CLIP_MAX_LENGTH)), CLIP_MAX_LENGTH)


@contextmanager
def _loading(folder: Path, component: str) -> Iterator[None]:
    """Re-raise a failure to load `component` as an OSError that names the folder and the component."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # what the loaders raise for corrupt files
        raise OSError(f"{folder}: component {component!r} cannot be loaded ({type(err).__name__}: {err})") from err
