"""One generation as one value: `GenerationRequest`, every setting of a pipeline call, and its `resolve`.

Everything that asks for images builds a request: `LatentDiffusionPipeline.__call__` (diffusers' keyword style),
`ldm generate` / `interpolate` / `invert`, the server, `ldm evaluate`'s sweeps and the training stage's validation
grid. `resolve` fills each unset field from the model (its folder's `SamplingDefaults`, its sizes, its noise
schedule) and checks every field once, raising ValueError whose message starts with the field's name, so a
bad request fails before any sampling work. A resolved request is again a `GenerationRequest`: no None left
where a default exists, the image as a tensor, the generator built from the seed, the scheduler an instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from diffusers import SchedulerMixin
from PIL import Image

from ldm.diffusion import SAMPLERS
from ldm.diffusion.samplers import StepCallback
from ldm.diffusion.sdedit import sdedit_steps
from ldm.diffusion.thresholding import Threshold
from ldm.generation import checks
from ldm.generation.checks import Geometry
from ldm.generation.inputs import image_batch
from ldm.generation.model_folder import SamplingDefaults
from ldm.generation.noise_schedule import DIFFUSERS_PREDICTION_NAMES, NoiseScheduleConfig
from ldm.generation.scheduler_loop import check_scheduler

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2^64
PreviewCallback = Callable[[int, list[Image.Image]], None]


def _doc(text: str, default: Any = None, **kwargs: Any) -> Any:
    """A field with its one-line description (read by the HTTP schema and the docs)."""
    return field(default=default, metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class GenerationRequest:
    """Every setting of one generation. None means: the model folder's default (see `resolve`)."""

    prompt: str | list[str] | None = _doc("the text to draw ('' samples the unconditional model)")
    negative_prompt: str | list[str] | None = _doc("guide away from this text instead of ''")
    prompt_embeds: torch.Tensor | None = _doc("(P, L, D) text embeddings instead of prompt")
    negative_prompt_embeds: torch.Tensor | None = _doc("(P or 1, L, D) embeddings instead of negative_prompt")
    guidance_scale: float | None = _doc("w in eps_u + w (eps_c - eps_u); 1 = no guidance (default: model's)")
    guidance_rescale: float = _doc("Lin et al.'s phi in [0, 1]: rescale the guided prediction's std", 0.0)
    num_inference_steps: int | None = _doc("sampling steps (default: model's)")
    sampler: str | None = _doc("one of ldm.diffusion.SAMPLERS (default: model's)")
    eta: float | None = _doc("DDIM's noise, 0 = deterministic (ddim only)")
    karras_sigmas: bool | None = _doc("step through Karras et al.'s noise levels")
    threshold: Threshold | None = _doc("clip the predicted x0 (default: what the folder's scheduler config asks)")
    scheduler: SchedulerMixin | type[SchedulerMixin] | None = _doc("a diffusers scheduler instead of our samplers")
    height: int | None = _doc("pixels (default: the model's size, or the image's)")
    width: int | None = _doc("pixels (default: the model's size, or the image's)")
    num_images_per_prompt: int = _doc("how many images to draw per prompt", 1)
    seed: int | None = _doc("seeds the generator (on the CPU unless the sampler draws noise per step)")
    seeds: tuple[int, ...] | None = _doc("image i's x_T drawn alone with seeds[i] (deterministic sampling only)")
    generator: torch.Generator | None = _doc("the random generator (instead of seed)")
    latents: torch.Tensor | None = _doc("x_T, (B, C, h, w); with image, the noise the image is noised with")
    image: Any = _doc("image-to-image: the start image(s), PIL, arrays or a (B, 3, H, W) tensor in [0, 1]")
    strength: float | None = _doc("with image: how much of the chain to run, in (0, 1] (default 0.8, or 1)")
    mask_image: Any = _doc("with image: repaint where the mask is white (1)")
    resample: int = _doc("with mask_image: RePaint's passes per step", 1)
    paste_unmasked: bool = _doc("with mask_image: take the input's pixels outside the mask", True)
    output_type: str = _doc("pil, np or latent", "pil")
    return_trajectory: bool = _doc("also return x_T .. x_0 and each step's predicted x0", False)
    progress: bool = _doc("show a progress bar", True)
    callback: StepCallback | None = _doc("callback(step, timestep, latents, pred_x0) after every step")
    preview_every: int = _doc("send the decoded x0 prediction every this many steps to on_preview (0: never)", 0)
    on_preview: PreviewCallback | None = _doc("on_preview(step, images) with the decoded previews")

    @property
    def draws_step_noise(self) -> bool:
        """Whether sampling draws noise after x_T (a stochastic sampler of ours, or inpainting's known region)."""
        if self.scheduler is not None:
            return False  # a diffusers scheduler's randn_tensor draws where the generator is, and moves it
        stochastic = self.sampler is not None and SAMPLERS[self.sampler].draws_step_noise(self.eta or 0.0)
        return stochastic or self.mask_image is not None

    @property
    def steps_run(self) -> int:
        """Steps the sampler runs for a resolved request: all, or image to image's last share of them."""
        steps = self.num_inference_steps
        return steps if self.image is None or self.strength is None else sdedit_steps(steps, self.strength)

    def resolve(self, model: ModelFacts) -> GenerationRequest:
        """This request with every default filled in from `model` and every field checked (ValueError naming
        the field)."""
        r = self._with_scheduler(model) if self.scheduler is not None else self._with_sampler(model)
        r = r._with_editing(model.geometry)
        checks.check_call_options(r.num_images_per_prompt, r.output_type, r.generator, r.draws_step_noise,
                                  model.device)  # fmt: skip
        rescale = checks.check_guidance_options(r.guidance_rescale, r.threshold, r.callback)
        if model.guidance_in_unet:
            checks.check_guidance_in_unet(r.negative_prompt, rescale)
        checks.check_previews(r.preview_every, r.on_preview)
        return replace(r, guidance_rescale=rescale, generator=r._generator(model.device))

    def _with_sampler(self, model: ModelFacts) -> GenerationRequest:
        """Our sampler's settings: guidance, steps, sampler, eta, sizes, Karras sigmas and the folder's clipping."""
        d = model.defaults
        sampler = d.sampler if self.sampler is None else self.sampler
        checks.check_sampler(sampler)
        eta = self.eta
        if eta is None:  # the folder's eta is DDIM's: another sampler asked for by name takes none
            eta = d.eta if sampler == "ddim" else 0.0
        eta = checks.check_eta(eta, sampler)
        karras = self.karras_sigmas
        if karras is None:  # the folder's Karras setting is for the samplers that walk spaced levels
            karras = d.karras_sigmas and "karras_sigmas" in SAMPLERS[sampler].chain_settings
        checks.check_karras_sigmas(karras, model.schedule, sampler)
        reads = SAMPLERS[sampler].folder_clipping  # each sampler clips x0 as diffusers' scheduler of it does
        threshold = self.threshold if self.threshold is not None else model.schedule.threshold(reads)
        r = replace(self, sampler=sampler, eta=eta, karras_sigmas=karras, threshold=threshold)
        return r._with_common(model)

    def _with_scheduler(self, model: ModelFacts) -> GenerationRequest:
        """A diffusers scheduler replaces our samplers: their options are refused by name, a class is built from
        the folder's scheduler config."""
        our_options = {"sampler": self.sampler, "eta": self.eta, "karras_sigmas": self.karras_sigmas,
                       "threshold": self.threshold}  # fmt: skip
        checks.check_scheduler_call(our_options, self.resample, self.return_trajectory)
        scheduler = self.scheduler
        if isinstance(scheduler, type) and issubclass(scheduler, SchedulerMixin):
            scheduler = scheduler.from_config(model.schedule.to_scheduler_config())
        scheduler = check_scheduler(scheduler, DIFFUSERS_PREDICTION_NAMES[model.schedule.prediction])
        return replace(self, scheduler=scheduler)._with_common(model)

    def _with_common(self, model: ModelFacts) -> GenerationRequest:
        """Guidance, steps and sizes: x_T's when the request gives latents, the U-Net's when it gives nothing (with
        an image, the image's size is filled in by `_with_editing`)."""
        d, height, width = model.defaults, self.height, self.width
        if self.image is None:
            height, width = checks.sides_of_latents(self.latents, model.geometry.vae_scale_factor, height, width)
            height = model.geometry.default_size if height is None else height
            width = model.geometry.default_size if width is None else width
        given = [model.geometry.default_size if side is None else side for side in (height, width)]
        checks.check_sides(model.geometry, *given)  # with an image, a side given must match it (`_with_editing`)
        guidance = d.guidance_scale if self.guidance_scale is None else self.guidance_scale
        steps = d.num_inference_steps if self.num_inference_steps is None else self.num_inference_steps
        return replace(
            self,
            guidance_scale=checks.check_guidance_scale(guidance),
            num_inference_steps=checks.check_steps(steps, model.schedule, self.sampler),
            height=height,
            width=width,
        )

    def _with_editing(self, geometry: Geometry) -> GenerationRequest:
        """The image as a (B, 3, H, W) tensor that sets the size, and the strength its default."""
        pixels = image_batch(self.image) if self.image is not None else None
        r = self
        if pixels is not None:
            height, width = checks.sized_like(geometry, pixels, self.height, self.width)
            r = replace(self, image=pixels, height=height, width=width)
        strength = checks.editing_strength(pixels is not None, r.strength, r.mask_image, r.resample,
                                           r.paste_unmasked, r.num_inference_steps)  # fmt: skip
        return replace(r, strength=strength if pixels is not None else None)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The generator: the one given, or one seeded with `seed` on the CPU (which draws the same x_T on every
        device), or on `device` when the call draws step noise, which must come from the sampling device."""
        checks.check_seeds(self.seed, self.seeds, self.generator, self.latents, self.draws_step_noise, SEED_LIMIT)
        if self.generator is not None or self.seed is None:
            return self.generator
        return torch.Generator(device if self.draws_step_noise else "cpu").manual_seed(self.seed)

    def settings(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named fields as a dict (e.g. what a PNG or a report records of a resolved request)."""
        return {name: getattr(self, name) for name in names}


class ModelFacts(NamedTuple):
    """What resolving a request reads from the model: the folder's defaults, its noise process, the sizes it
    draws, the device it samples on, and whether its U-Net takes the guidance scale as an input (a distilled
    student: no classifier-free guidance)."""

    defaults: SamplingDefaults
    schedule: NoiseScheduleConfig
    geometry: Geometry
    device: torch.device
    guidance_in_unet: bool = False


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GenerationRequest))
# The fields that say how to sample (as a folder's defaults, a PNG's settings or a report records them).
SAMPLING_FIELDS = ("guidance_scale", "num_inference_steps", "sampler", "eta", "height", "width", "karras_sigmas")


def field_doc(name: str) -> str:
    """The one-line description of a request field."""
    return next(f.metadata["doc"] for f in fields(GenerationRequest) if f.name == name)
