"""Running a resolved `GenerationRequest` on a pipeline: text conditioning, x_T, the chain, decoding.

One run: encode the prompts once, draw x_T ~ N(0, I) exactly as diffusers does (or per image from its own
seed), walk the reverse chain with one of `ldm.diffusion.SAMPLERS` (or a diffusers scheduler) on the guided
U-Net (`LatentDiffusionPipeline.guided_model`: classifier-free guidance, or the w embedding for a U-Net distilled
to take it), then decode z_0 / scaling_factor with the VAE. Image-to-image noises the image's latents to the step
`strength` names and samples from there (SDEdit); inpainting also resets the unmasked region at every step
(RePaint) and, with `paste_unmasked`, takes the input's pixels outside the mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ldm.diffusion import SAMPLERS, Inpainting, sdedit_start_on
from ldm.diffusion.samplers import SampleOutput, StepCallback
from ldm.generation.inputs import check_latents, latent_mask, mask_batch, match_batch
from ldm.generation.request import GenerationRequest
from ldm.generation.scheduler_loop import sample_with_scheduler
from ldm.images import to_numpy, to_pil

if TYPE_CHECKING:  # the pipeline imports this module; for annotations only
    from ldm.generation.pipeline import LatentDiffusionPipeline


@dataclass
class PipelineOutput:
    """What a pipeline call returns. Images are ordered prompt by prompt: prompt 0's images, then prompt 1's."""

    images: list[Image.Image] | np.ndarray | torch.Tensor  # PIL list | (B, H, W, 3) float32 in [0, 1] | latents
    trajectory: torch.Tensor | None = None  # x_T .. x_0 latents, (steps + 1, B, C, h, w), when asked for
    trajectory_x0: torch.Tensor | None = None  # the x_0 predicted from each x_t, (steps, B, C, h, w)


@dataclass
class EditInputs:
    """Image-to-image and inpainting inputs on the call's batch: latents of the image, latent and pixel masks."""

    init: torch.Tensor | None = None  # (B, C, h, w)
    mask: torch.Tensor | None = None  # (B, 1, h, w), 1 = repaint
    pixel_mask: torch.Tensor | None = None  # (1 or B, 1, H, W)


def run(pipe: LatentDiffusionPipeline, r: GenerationRequest) -> PipelineOutput:
    """Generate what the resolved request `r` asks for."""
    cond, uncond = pipe._text_conditioning(
        r.prompt, r.negative_prompt, r.prompt_embeds, r.negative_prompt_embeds, r.num_images_per_prompt
    )  # (B, L, D) each
    f = pipe.vae_scale_factor
    shape = (cond.shape[0], pipe.unet.config.in_channels, r.height // f, r.width // f)  # (B, C, h, w)
    x_T = initial_noise(pipe, r, shape)
    edit = edit_inputs(pipe, r, shape)
    model = pipe.guided_model(r.guidance_scale, uncond, r.guidance_rescale)
    pred_x0: list[torch.Tensor] = []
    on_step = step_callback(pipe, r, pred_x0)
    if r.scheduler is not None:
        result = sample_with_scheduler(
            r.scheduler, model, x_T, num_steps=r.num_inference_steps,
            model_kwargs={"encoder_hidden_states": cond}, generator=r.generator, init=edit.init,
            strength=r.strength or 1.0, mask=edit.mask, callback=on_step, progress=r.progress,
        )  # fmt: skip
    else:
        result = sample_chain(pipe, r, model, x_T, cond, edit, on_step)
    trajectory_x0 = torch.stack(pred_x0) if r.return_trajectory else None
    return PipelineOutput(finished_images(pipe, r, result.sample, edit), result.trajectory, trajectory_x0)


def initial_noise(pipe: LatentDiffusionPipeline, r: GenerationRequest, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T: the request's latents, or one draw per image from its own CPU seed, or one draw from the generator
    (randn_tensor: on the generator's device, then moved; init_noise_sigma = 1)."""
    if r.latents is not None:
        return check_latents(r.latents, shape).to(pipe.device, pipe.dtype)
    if r.seeds is None:
        return randn_tensor(shape, generator=r.generator, device=pipe.device, dtype=pipe.dtype)
    if len(r.seeds) != shape[0]:
        raise ValueError(f"seeds: has {len(r.seeds)} seeds for {shape[0]} images (prompts x images per prompt)")
    one = (1, *shape[1:])
    return torch.cat([
        randn_tensor(one, generator=torch.Generator("cpu").manual_seed(seed), device=pipe.device, dtype=pipe.dtype)
        for seed in r.seeds
    ])  # fmt: skip


def edit_inputs(pipe: LatentDiffusionPipeline, r: GenerationRequest, shape: tuple[int, ...]) -> EditInputs:
    """The image's latents and the masks, one row per image of the call."""
    edit = EditInputs()
    if r.image is None:
        return edit
    per_prompt = r.num_images_per_prompt
    edit.init = match_batch(pipe.encode_image(r.image), shape[0], per_prompt, "image")
    if r.mask_image is not None:
        edit.pixel_mask = mask_batch(r.mask_image, (r.height, r.width)).to(pipe.device, pipe.dtype)
        edit.mask = match_batch(latent_mask(edit.pixel_mask, pipe.vae_scale_factor), shape[0], per_prompt,
                                "mask_image")  # fmt: skip
    return edit


def step_callback(pipe: LatentDiffusionPipeline, r: GenerationRequest, pred_x0: list[torch.Tensor]) -> StepCallback:
    """After each step: keep the predicted x0 for the trajectory, call the request's callback with the step
    counted from 0 (our samplers pass the chain index, which counts down), after decoding the previews due."""
    steps_done = itertools.count()

    def on_step(index: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        step = next(steps_done)
        if r.return_trajectory:
            pred_x0.append(x0)
        done = step + 1  # no preview after the last step, whose x0 is the image itself
        if r.on_preview and r.preview_every and done % r.preview_every == 0 and done < r.steps_run and x0 is not None:
            r.on_preview(step, to_pil(pipe.decode(x0)))
        if r.callback is not None:
            r.callback(step, t, x, x0)

    return on_step


def sample_chain(
    pipe: LatentDiffusionPipeline,
    r: GenerationRequest,
    model: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    cond: torch.Tensor,
    edit: EditInputs,
    on_step: StepCallback,
) -> SampleOutput:
    """Run our sampler: from x_T, or from the image's latents noised with x_T to the step `strength` names."""
    sampler = SAMPLERS[r.sampler]
    settings = chain_settings(pipe, r)
    start_step = 0
    if edit.init is not None:
        chain = sampler.chain(pipe.diffusion, r.num_inference_steps, **settings)
        x_T, start_step = sdedit_start_on(chain, edit.init, x_T, r.strength)
    inpaint = Inpainting(edit.init, edit.mask, r.resample) if edit.mask is not None else None
    return sampler(
        model, pipe.diffusion, x_T, num_steps=r.num_inference_steps, **settings, **folder_options(pipe, r),
        model_kwargs={"encoder_hidden_states": cond}, threshold=r.threshold, start_step=start_step, inpaint=inpaint,
        generator=r.generator, return_trajectory=r.return_trajectory, callback=on_step, progress=r.progress,
    )  # fmt: skip


def chain_settings(pipe: LatentDiffusionPipeline, r: GenerationRequest) -> dict[str, Any]:
    """The chain settings the request's sampler takes (`Sampler.chain_settings`), from the folder and the request:
    spacing, offset and Karras sigmas, or LCM's original_inference_steps (LCMScheduler reads no spacing or offset)."""
    schedule = pipe.noise_schedule
    every = {
        "spacing": schedule.timestep_spacing,
        "steps_offset": schedule.steps_offset,
        "karras_sigmas": r.karras_sigmas,
        "original_inference_steps": schedule.lcm_original_steps,
    }
    return {name: every[name] for name in SAMPLERS[r.sampler].chain_settings}


def folder_options(pipe: LatentDiffusionPipeline, r: GenerationRequest) -> dict[str, Any]:
    """The keys of the folder's scheduler config one sampler alone reads, as diffusers' scheduler of it does:
    DDIM's set_alpha_to_one (with the request's eta), LCM's timestep_scaling."""
    schedule = pipe.noise_schedule
    if r.sampler == "ddim":
        return {"eta": r.eta, "final_alphabar": schedule.final_alphabar(pipe.diffusion)}
    if r.sampler == "lcm":
        return {"timestep_scaling": schedule.timestep_scaling}
    return {}


def finished_images(
    pipe: LatentDiffusionPipeline, r: GenerationRequest, latents: torch.Tensor, edit: EditInputs
) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """The output: latents as they are, or decoded (with an inpainted image's own pixels outside the mask)."""
    if r.output_type == "latent":
        return latents
    images = pipe.decode(latents)
    if edit.pixel_mask is not None and r.paste_unmasked:
        # The decoder's GroupNorm and attention see the whole latent, so a repainted region moves every
        # pixel a little; the image's own pixels outside the mask are the faithful ones.
        batch, per_prompt = latents.shape[0], r.num_images_per_prompt
        keep = match_batch(1 - (edit.pixel_mask >= 0.5).to(images.dtype), batch, per_prompt, "mask_image")
        original = match_batch(r.image.to(images.device, images.dtype) * 2 - 1, batch, per_prompt, "image")
        images = torch.lerp(images, original, keep)
    return to_pil(images) if r.output_type == "pil" else to_numpy(images)
