"""The settings of one pipeline call, resolved against the folder's defaults and checked.

Every check raises ValueError whose message starts with the argument's name and says what would be valid, so
a bad call fails before any sampling work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ldm.diffusion.schedules import spaced_timesteps
from ldm.diffusion.sdedit import sdedit_steps
from ldm.model_folder import SAMPLERS, SamplingDefaults
from ldm.noise_schedule import NoiseScheduleConfig

OUTPUT_TYPES = ("pil", "np", "latent")
IMG2IMG_STRENGTH = 0.8  # diffusers' default: keep the layout, redraw the details
DETERMINISTIC = ("ddim", "dpmpp_2m")  # (ddim only with eta = 0)
OUR_SAMPLER_OPTIONS = ("sampler", "eta", "karras_sigmas", "threshold")


@dataclass(frozen=True)
class SamplingSettings:
    """The resolved settings of one pipeline call (see `LatentDiffusionPipeline.resolve_settings`)."""

    guidance_scale: float
    num_inference_steps: int
    sampler: str
    eta: float
    height: int
    width: int
    karras_sigmas: bool = False

    @property
    def stochastic(self) -> bool:
        """True when the sampler draws noise at every step (all but DDIM with eta = 0 and DPM-Solver++(2M))."""
        return self.sampler not in DETERMINISTIC or self.eta > 0


class Geometry(NamedTuple):
    """What image sizes a pipeline draws: sides are multiples of `size_multiple` (the VAE's factor times the
    U-Net's downsampling); `default_size` is the side the U-Net was built for."""

    vae_scale_factor: int
    size_multiple: int
    default_size: int


def resolve_settings(
    defaults: SamplingDefaults,
    schedule: NoiseScheduleConfig,
    geometry: Geometry,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    height: int | None = None,
    width: int | None = None,
    karras_sigmas: bool | None = None,
) -> SamplingSettings:
    """The settings: each None is the folder's default (sizes: the U-Net's; eta: 0 for a sampler other than
    DDIM), then every value is checked."""
    d = defaults
    sampler = d.sampler if sampler is None else sampler
    if eta is None:  # the folder's eta is DDIM's: another sampler asked for by name takes none
        eta = d.eta if sampler == "ddim" else 0.0
    s = SamplingSettings(
        guidance_scale=d.guidance_scale if guidance_scale is None else as_float(guidance_scale, "guidance_scale"),
        num_inference_steps=d.num_inference_steps if num_inference_steps is None else num_inference_steps,
        sampler=sampler,
        eta=as_float(eta, "eta"),
        height=geometry.default_size if height is None else height,
        width=geometry.default_size if width is None else width,
        karras_sigmas=d.karras_sigmas if karras_sigmas is None else karras_sigmas,
    )
    if s.guidance_scale < 0:
        raise ValueError(f"guidance_scale: must be >= 0 (1 = no guidance, 0 = unconditional), got {s.guidance_scale}")
    if s.sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
    if not 0.0 <= s.eta <= 1.0:
        raise ValueError(f"eta: must be in [0, 1], got {s.eta}")
    if s.eta > 0 and s.sampler != "ddim":
        raise ValueError(f"eta: is DDIM's noise; sampler {s.sampler!r} takes none, got eta={s.eta}")
    if not isinstance(s.karras_sigmas, bool):
        raise ValueError(f"karras_sigmas: must be True or False, got {s.karras_sigmas!r}")
    if s.karras_sigmas and schedule.zero_terminal_snr:
        raise ValueError(
            "karras_sigmas: this model's schedule has zero terminal SNR (sigma_max = inf), which Karras sigmas "
            "cannot span; sample on its own timesteps"
        )
    _check_steps(s.num_inference_steps, schedule)
    check_sides(geometry, s.height, s.width)
    return s


def _check_steps(steps: object, schedule: NoiseScheduleConfig) -> None:
    if not is_int(steps) or steps < 1:
        raise ValueError(f"num_inference_steps: must be a positive int, got {steps!r}")
    try:  # the steps must fit in the training chain after spacing and steps_offset
        spaced_timesteps(schedule.num_train_timesteps, steps, schedule.timestep_spacing, schedule.steps_offset)
    except ValueError as err:
        raise ValueError(
            f"num_inference_steps: {steps} does not fit the {schedule.num_train_timesteps}-step chain "
            f"({schedule.timestep_spacing} spacing, steps_offset {schedule.steps_offset}): {err}"
        ) from err


def check_sides(geometry: Geometry, height: object, width: object, source: str | None = None) -> None:
    """Both sides must be positive multiples of the size multiple; `source` names where they came from."""
    multiple, factor = geometry.size_multiple, geometry.vae_scale_factor
    for name, side in (("height", height), ("width", width)):
        if not is_int(side) or side < multiple or side % multiple:
            subject = f"{source}: its {name} {side!r} is not" if source else f"{name}: must be"
            raise ValueError(
                f"{subject} a positive multiple of {multiple} (VAE factor {factor} x U-Net downsampling "
                f"{multiple // factor})" + ("" if source else f", got {side!r}")
            )


def sides_of_latents(
    latents: object, vae_scale_factor: int, height: int | None, width: int | None
) -> tuple[int | None, int | None]:
    """height and width, each unset one taken from x_T (B, C, h, w) as h f, w f; as given when `latents` is not
    a 4-D tensor (a wrong shape is `check_latents`' to name)."""
    if not (isinstance(latents, torch.Tensor) and latents.ndim == 4):
        return height, width
    h, w = (side * vae_scale_factor for side in latents.shape[-2:])
    return (h if height is None else height), (w if width is None else width)


def sized_like(
    s: SamplingSettings, geometry: Geometry, pixels: torch.Tensor, height: int | None, width: int | None
) -> SamplingSettings:
    """The settings with the init image's size; a height or width given that differs is an error."""
    image_height, image_width = pixels.shape[-2:]
    for name, given, actual in (("height", height, image_height), ("width", width, image_width)):
        if given is not None and given != actual:
            raise ValueError(f"{name}: is {given} but the image's {name} is {actual}; leave it unset")
    check_sides(geometry, image_height, image_width, "image")
    return replace(s, height=image_height, width=image_width)


def editing_strength(
    has_image: bool, strength: object, mask_image: object, resample: object, paste_unmasked: object, steps: int
) -> float:
    """The image-to-image strength to use (its default when None); errors for editing options without an image."""
    if not isinstance(paste_unmasked, bool):
        raise ValueError(f"paste_unmasked: must be True or False, got {paste_unmasked!r}")
    if not has_image:
        for name, value, unset in (("strength", strength, None), ("mask_image", mask_image, None),
                                   ("resample", resample, 1)):  # fmt: skip
            if value is not unset:
                raise ValueError(f"{name}: needs image (the image to edit)")
        return 1.0
    if not (is_int(resample) and resample >= 1):
        raise ValueError(f"resample: must be an int >= 1 (RePaint passes per step), got {resample!r}")
    if resample > 1 and mask_image is None:
        raise ValueError("resample: needs mask_image (it redoes inpainting steps)")
    if strength is None:
        return 1.0 if mask_image is not None else IMG2IMG_STRENGTH
    strength = as_float(strength, "strength")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: must be in (0, 1], got {strength}")
    if sdedit_steps(steps, strength) < 1:
        raise ValueError(
            f"strength: {strength} of {steps} steps runs no step; raise strength to >= {1 / steps:.3g} "
            "or num_inference_steps"
        )
    return strength


def check_guidance_options(guidance_rescale: object, threshold: object, callback: object) -> float:
    """guidance_rescale as a float in [0, 1]; threshold and callback must be callables."""
    guidance_rescale = as_float(guidance_rescale, "guidance_rescale")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale: must be in [0, 1], got {guidance_rescale}")
    if threshold is not None and not callable(threshold):
        raise ValueError(f"threshold: must be a StaticThreshold or DynamicThreshold, not {type(threshold).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: must be callable(step_index, timestep, latents, pred_x0), got {callback!r}")
    return guidance_rescale


def check_scheduler_call(our_options: dict[str, object], resample: object, return_trajectory: bool) -> None:
    """With a diffusers scheduler, our samplers' options have no meaning: refuse them by name."""
    for name in OUR_SAMPLER_OPTIONS:
        if our_options.get(name) is not None:
            raise ValueError(f"{name}: is an option of our samplers; with scheduler=, set it in the scheduler")
    if resample != 1:
        raise ValueError("resample: RePaint's jumps run on our samplers, not on a diffusers scheduler")
    if return_trajectory:
        raise ValueError("return_trajectory: is for our samplers; with scheduler=, use callback")


def check_call_options(
    num_images: object, output_type: object, generator: object, needs_step_noise: bool, device: torch.device
) -> None:
    """Images per prompt, output type and generator; a stochastic sampler needs a generator on the device."""
    if not is_int(num_images) or num_images < 1:
        raise ValueError(f"num_images_per_prompt: must be a positive int, got {num_images!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: must be one torch.Generator or None, got {type(generator).__name__}")
    # x_T is drawn on the generator's device and moved (diffusers' randn_tensor); the samplers' step
    # noise is drawn directly on the pipeline's device, which needs a generator there.
    if needs_step_noise and generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator: is on {generator.device.type} but stochastic sampling (ddpm, ancestral, SDE, ddim with "
            f"eta > 0, inpainting) draws its noise on {device.type}; pass torch.Generator(device={device.type!r})"
        )


def as_float(value: object, name: str) -> float:
    """`value` as a finite float; anything else (a string, a bool, NaN, infinity) is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
