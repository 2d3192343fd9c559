"""The checks of a generation request's fields (see `ldm.generation.request`), one function per field or group.

Every check raises ValueError whose message starts with the argument's name and says what would be valid, so
a bad call fails before any sampling work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ldm.diffusion import SAMPLERS
from ldm.diffusion.consistency import lcm_timesteps
from ldm.diffusion.schedules import spaced_timesteps
from ldm.diffusion.sdedit import sdedit_steps
from ldm.generation.noise_schedule import NoiseScheduleConfig

OUTPUT_TYPES = ("pil", "np", "latent")
IMG2IMG_STRENGTH = 0.8  # diffusers' default: keep the layout, redraw the details
OUR_SAMPLER_OPTIONS = ("sampler", "eta", "karras_sigmas", "threshold")


class OutOfRange(ValueError):
    """A value of the right type outside what the field allows (the server answers it as `out_of_range`)."""


class Geometry(NamedTuple):
    """What image sizes a pipeline draws: sides are multiples of `size_multiple` (the VAE's factor times the
    U-Net's downsampling); `default_size` is the side the U-Net was built for."""

    vae_scale_factor: int
    size_multiple: int
    default_size: int


def check_sampler(sampler: object) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def check_eta(eta: object, sampler: str | None = None) -> float:
    """eta in [0, 1], and 0 unless `sampler` takes it (None: any sampler's default)."""
    eta = as_float(eta, "eta")
    if not 0.0 <= eta <= 1.0:
        raise OutOfRange(f"eta: must be in [0, 1], got {eta}")
    if eta > 0 and sampler is not None and "eta" not in SAMPLERS[sampler].options:
        raise ValueError(f"eta: is DDIM's noise; sampler {sampler!r} takes none, got eta={eta}")
    return eta


def check_guidance_scale(guidance_scale: object) -> float:
    guidance_scale = as_float(guidance_scale, "guidance_scale")
    if guidance_scale < 0:
        raise OutOfRange(f"guidance_scale: must be >= 0 (1 = no guidance, 0 = unconditional), got {guidance_scale}")
    return guidance_scale


def check_karras_sigmas(karras_sigmas: object, schedule: NoiseScheduleConfig, sampler: str | None = None) -> None:
    """A bool; True needs a schedule with finite sigma_max and a sampler that walks spaced levels (None: any)."""
    check_bool(karras_sigmas, "karras_sigmas")
    if karras_sigmas and sampler is not None and "karras_sigmas" not in SAMPLERS[sampler].chain_settings:
        raise ValueError(
            f"karras_sigmas: sampler {sampler!r} visits the timesteps its model was distilled on, not Karras et al.'s "
            "noise levels; leave karras_sigmas unset"
        )
    if karras_sigmas and schedule.zero_terminal_snr:
        raise ValueError(
            "karras_sigmas: this model's schedule has zero terminal SNR (sigma_max = inf), which Karras sigmas "
            "cannot span; sample on its own timesteps"
        )


def check_steps(steps: object, schedule: NoiseScheduleConfig, sampler: str | None = None) -> int:
    """A positive int that fits the chain `sampler` walks (None: a spaced chain, as a diffusers scheduler's)."""
    check_positive_int(steps, "num_inference_steps")
    if sampler is not None and SAMPLERS[sampler].timesteps == "lcm":
        # ValueError naming num_inference_steps when it is more than the folder's original_inference_steps.
        lcm_timesteps(schedule.num_train_timesteps, steps, schedule.lcm_original_steps)
        return steps
    try:  # the steps must fit in the training chain after spacing and steps_offset
        spaced_timesteps(schedule.num_train_timesteps, steps, schedule.timestep_spacing, schedule.steps_offset)
    except ValueError as err:
        raise ValueError(
            f"num_inference_steps: {steps} does not fit the {schedule.num_train_timesteps}-step chain "
            f"({schedule.timestep_spacing} spacing, steps_offset {schedule.steps_offset}): {err}"
        ) from err
    return steps


def check_sides(geometry: Geometry, height: object, width: object, source: str | None = None) -> None:
    """Both sides must be positive multiples of the size multiple; `source` names where they came from."""
    multiple, factor = geometry.size_multiple, geometry.vae_scale_factor
    for name, side in (("height", height), ("width", width)):
        if not is_int(side) or side < multiple or side % multiple:
            subject = f"{source}: its {name} {side!r} is not" if source else f"{name}: must be"
            error = OutOfRange if is_int(side) and side < 1 else ValueError  # 0 or less: no size at all
            raise error(
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


def sized_like(geometry: Geometry, pixels: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
    """The init image's (height, width); a height or width given that differs is an error."""
    image_height, image_width = pixels.shape[-2:]
    for name, given, actual in (("height", height, image_height), ("width", width, image_width)):
        if given is not None and given != actual:
            raise ValueError(f"{name}: is {given} but the image's {name} is {actual}; leave it unset")
    check_sides(geometry, image_height, image_width, "image")
    return image_height, image_width


def editing_strength(
    has_image: bool, strength: object, mask_image: object, resample: object, paste_unmasked: object, steps: int
) -> float:
    """The image-to-image strength to use (its default when None); errors for editing options without an image."""
    check_bool(paste_unmasked, "paste_unmasked")
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
        raise OutOfRange(f"strength: must be in (0, 1], got {strength}")
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
        raise OutOfRange(f"guidance_rescale: must be in [0, 1], got {guidance_rescale}")
    if threshold is not None and not callable(threshold):
        raise ValueError(f"threshold: must be a StaticThreshold or DynamicThreshold, not {type(threshold).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: must be callable(step_index, timestep, latents, pred_x0), got {callback!r}")
    return guidance_rescale


def check_guidance_in_unet(negative_prompt: object, guidance_rescale: float) -> None:
    """A U-Net that takes the guidance scale as an input (time_cond_proj_dim, a distilled student) runs one
    conditional pass per step and no classifier-free guidance: the options of that guidance have nothing to act on."""
    if negative_prompt is not None:
        raise ValueError(
            "negative_prompt: this model's U-Net takes the guidance scale as an input (a guidance-distilled student) "
            "and makes no unconditional pass for a negative prompt to replace; leave it unset"
        )
    if guidance_rescale > 0:
        raise ValueError(
            f"guidance_rescale: this model's U-Net takes the guidance scale as an input (a guidance-distilled "
            f"student) and runs no classifier-free guidance to rescale; got {guidance_rescale}, leave it at 0"
        )


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
    check_positive_int(num_images, "num_images_per_prompt")
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


def check_previews(preview_every: object, on_preview: object) -> None:
    if not is_int(preview_every) or preview_every < 0:
        error = OutOfRange if is_int(preview_every) else ValueError
        raise error(f"preview_every: must be an int >= 0 (0: no previews), got {preview_every!r}")
    if on_preview is not None and not callable(on_preview):
        raise ValueError(f"on_preview: must be callable(step, images), got {on_preview!r}")


def check_seeds(seed: object, seeds: object, generator: object, latents: object, step_noise: bool, limit: int) -> None:
    """A seed, or one seed per image (each x_T drawn alone, so not with latents or per-step noise), not both."""

    def valid(value: object) -> bool:
        return is_int(value) and 0 <= value < limit

    if seed is not None and not valid(seed):
        raise ValueError(f"seed: must be an int in [0, 2^64), got {seed!r}")
    if seeds is None:
        return
    if not isinstance(seeds, tuple) or not seeds or not all(valid(s) for s in seeds):
        raise ValueError(f"seeds: must be a non-empty tuple of ints in [0, 2^64), one per image, got {seeds!r}")
    for name, value in (("seed", seed), ("generator", generator), ("latents", latents)):
        if value is not None:
            raise ValueError(f"seeds: draw each image's x_T, so give seeds or {name}, not both")
    if step_noise:
        raise ValueError(
            "seeds: draw x_T alone per image, but this sampler (or inpainting) also draws noise at every step "
            "from one generator; give seed, or one request per image"
        )


def check_positive_int(value: object, name: str) -> int:
    if not is_int(value) or value < 1:
        error = OutOfRange if is_int(value) else ValueError
        raise error(f"{name}: must be a positive int, got {value!r}")
    return value


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be True or False, got {value!r}")
    return value


def as_float(value: object, name: str) -> float:
    """`value` as a finite float; anything else (a string, a bool, NaN, infinity) is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
