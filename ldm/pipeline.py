"""Text to image: `LatentDiffusionPipeline`, our samplers and classifier-free guidance over a diffusers folder.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/quickstart/pipeline")
    images = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0)).images
    faster = pipe("a red circle", sampler="dpmpp_2m", num_inference_steps=15).images
    edited = pipe("a red circle on a blue background", image=images[0], strength=0.6).images
    x_T = pipe.invert(images[0], "a red circle")  # pipe(..., latents=x_T, sampler="ddim", eta=0) redraws it

One call: encode the prompts once, draw x_T ~ N(0, I) exactly as diffusers does, walk the reverse chain
with one of `ldm.diffusion.SAMPLERS` (or any diffusers scheduler object) on the guided U-Net, then decode
z_0 / scaling_factor with the VAE. Image-to-image noises the image's latents to the step `strength` names
and samples from there (SDEdit); inpainting also resets the unmasked region at every step (RePaint).

A downloaded Stable Diffusion folder's scheduler config is read whole: `set_alpha_to_one` (where DDIM's last
step lands), `clip_sample` / `thresholding` (the default clipping of x0), spacing, offset, zero-SNR rescaling
and prediction type; its DDIM draws what diffusers' DDIMScheduler draws from that config (tests/pipeline/
test_sd_folders.py). The folder is a Stable Diffusion pipeline folder (see `ldm.model_folder`), so
`diffusers.StableDiffusionPipeline.from_pretrained` loads it too and, with the same scheduler, steps, guidance
scale and seed, draws the same images (float32 CPU: to ~1e-6 of the latents' scale). Two
deliberate differences from diffusers: guidance 0 <= w < 1 is applied as written (w = 0 samples the
unconditional model) where diffusers switches guidance off for w <= 1; and with `trailing` or `linspace`
timestep spacing each DDIM step goes to the previous timestep of the subset (DESIGN.md), where diffusers'
DDIMScheduler goes to t - T // n, so only the default `leading` spacing draws identical images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from conditioning import TextEncoder
from ldm.diffusion import SAMPLERS as SAMPLER_FUNCTIONS
from ldm.diffusion import (
    Inpainting,
    classifier_free_guidance,
    ddim_invert,
    sdedit_start,
)
from ldm.diffusion.samplers import SampleOutput, StepCallback
from ldm.diffusion.thresholding import Threshold
from ldm.images import to_numpy, to_pil
from ldm.lora_weights import load_unet_lora
from ldm.model_folder import (
    SamplingDefaults,
    check_model_folder,
    loading,
    read_scheduler_config,
    text_positions,
    write_model_index,
    write_scheduler_config,
)
from ldm.noise_schedule import DIFFUSERS_PREDICTION_NAMES, NoiseScheduleConfig
from ldm.pipeline_inputs import (
    check_latents,
    check_prompts,
    embeddings_for_guidance,
    image_batch,
    latent_mask,
    mask_batch,
    match_batch,
)
from ldm.pipeline_settings import (
    Geometry,
    SamplingSettings,
    check_call_options,
    check_guidance_options,
    check_scheduler_call,
    check_sides,
    editing_strength,
    resolve_settings,
    sides_of_latents,
    sized_like,
)
from ldm.scheduler_loop import check_scheduler, sample_with_scheduler

__all__ = ["LatentDiffusionPipeline", "PipelineOutput", "SamplingDefaults", "SamplingSettings"]


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
    (a single conditional pass when w = 1) and applies the chosen sampler's update; finally
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
        self.lora_scales: dict[str, float] = {}  # the loaded U-Net LoRA adapters and their scales

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
        variant: str | None = None,
    ) -> LatentDiffusionPipeline:
        """Load a model folder (ours or any SD 1.x/2.x folder with safetensors weights); `variant` picks weight
        files such as `diffusion_pytorch_model.fp16.safetensors` (variant="fp16").

        A missing folder, model_index.json or component raises FileNotFoundError naming them; a component
        whose files are corrupt (truncated weights, invalid JSON) raises OSError naming it. The text
        encoder uses TextEncoderConfig's defaults (clip_skip 0, frozen); the latent scale is the VAE
        config's scaling_factor.
        """
        folder = check_model_folder(folder)
        dtype_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        with loading(folder, "vae", variant):
            vae = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", use_safetensors=True, variant=variant, **dtype_kwargs
            )
        with loading(folder, "unet", variant):
            unet = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", use_safetensors=True, variant=variant, **dtype_kwargs
            )
        with loading(folder, "text_encoder", variant):
            text_encoder = TextEncoder.from_pretrained(folder, max_length=text_positions(folder), variant=variant)
        pipe = cls(vae, text_encoder, unet, read_scheduler_config(folder), SamplingDefaults.load(folder))
        return pipe.to(device, torch_dtype)

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Add a U-Net LoRA adapter, W x + scale (alpha / r) B A x, from diffusers' `pytorch_lora_weights.safetensors`
        (the file, or a folder holding it; see `ldm.lora_weights`); several adapters add up. Returns its name."""
        if not math.isfinite(scale):
            raise ValueError(f"scale: must be a finite number, got {scale}")
        name = load_unet_lora(self.unet, path, adapter_name)
        self.lora_scales[name] = float(scale)
        self.unet.set_adapters(list(self.lora_scales), list(self.lora_scales.values()))
        self.unet.requires_grad_(False)  # the new adapter's weights are for inference too
        return name

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter: the U-Net is the folder's again."""
        if self.lora_scales:
            self.unet.unload_lora()
        self.lora_scales = {}

    # ---- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: Literal["pil", "np", "latent"] = "pil",
        return_trajectory: bool = False,
        progress: bool = True,
        *,
        karras_sigmas: bool | None = None,
        scheduler: SchedulerMixin | type[SchedulerMixin] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        threshold: Threshold | None = None,
        latents: torch.Tensor | None = None,
        image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
        resample: int = 1,
        paste_unmasked: bool = True,
        callback: StepCallback | None = None,
    ) -> PipelineOutput:
        """Generate `num_images_per_prompt` images per prompt (or per row of `prompt_embeds`).

        Sampling: `sampler` is one of ldm.diffusion.SAMPLERS (eta only for ddim; `karras_sigmas` for any), or
        `scheduler` is a diffusers scheduler object or class (a class is built from the folder's scheduler
        config) stepped as diffusers steps it. None for guidance_scale, num_inference_steps, sampler, eta or
        karras_sigmas means the folder's `SamplingDefaults`; None for height / width means the U-Net's size (or
        the init image's). `guidance_rescale` is Lin et al.'s phi; `threshold` clips the predicted x0 (our
        samplers; None: what the folder's scheduler config asks for, `clip_sample` / `thresholding`; a diffusers
        scheduler thresholds by its own config).
        `latents` is x_T (B, C, h, w) with B = prompts x num_images_per_prompt (its h, w set the image size
        when height / width are None); with `image` it is the noise the image's latents are noised with.
        Image-to-image: `image` (PIL image(s), arrays or a (B, 3, H, W) tensor in [0, 1]) and `strength` in
        (0, 1] (default 0.8): of n steps the last int(n strength) are run, from the image's latents noised to
        the first of them. Inpainting: also `mask_image` (white / 1 = repaint; default strength 1), the known
        region reset at every step, each step redone `resample` times (RePaint's jumps); with `paste_unmasked`
        the decoded image takes the input's pixels outside the mask (`output_type="latent"` is not pasted).
        `callback(step, timestep, latents, pred_x0)` runs after every step run, step = 0, 1, ... as in diffusers.
        Invalid arguments raise ValueError naming the argument, before any sampling work.
        """
        if scheduler is not None:
            our_options = {"sampler": sampler, "eta": eta, "karras_sigmas": karras_sigmas, "threshold": threshold}
            check_scheduler_call(our_options, resample, return_trajectory)
            scheduler = self._scheduler_for(scheduler)
        if image is None:  # x_T sets the size unless the call gives one (a mismatch is named below)
            height, width = sides_of_latents(latents, self.vae_scale_factor, height, width)
        s = self.resolve_settings(guidance_scale, num_inference_steps, sampler, eta, height, width, karras_sigmas)
        pixels = image_batch(image) if image is not None else None
        if pixels is not None:
            s = sized_like(s, self.geometry, pixels, height, width)
        strength = editing_strength(
            pixels is not None, strength, mask_image, resample, paste_unmasked, s.num_inference_steps
        )
        # Our stochastic samplers and RePaint draw step noise on the device; a diffusers scheduler's
        # randn_tensor draws where the generator is and moves it.
        needs_step_noise = scheduler is None and (s.stochastic or mask_image is not None)
        check_call_options(num_images_per_prompt, output_type, generator, needs_step_noise, self.device)
        guidance_rescale = check_guidance_options(guidance_rescale, threshold, callback)

        cond, uncond = self._text_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt
        )  # (B, L, D) each
        f = self.vae_scale_factor
        shape = (cond.shape[0], self.unet.config.in_channels, s.height // f, s.width // f)  # (B, C, h, w)
        if latents is not None:
            x_T = check_latents(latents, shape).to(self.device, self.dtype)
        else:
            x_T = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)  # init_noise_sigma = 1
        init = mask = pixel_mask = None
        if pixels is not None:
            init = match_batch(self.encode_image(pixels), shape[0], num_images_per_prompt, "image")
        if mask_image is not None:
            pixel_mask = mask_batch(mask_image, (s.height, s.width)).to(self.device, self.dtype)
            mask = match_batch(latent_mask(pixel_mask, f), shape[0], num_images_per_prompt, "mask_image")

        model = classifier_free_guidance(
            self._unet_fn, s.guidance_scale, {"encoder_hidden_states": uncond}, guidance_rescale
        )
        pred_x0: list[torch.Tensor] = []
        steps_done = itertools.count()  # our samplers pass the chain index, which counts down

        def on_step(index: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if return_trajectory:
                pred_x0.append(x0)
            if callback is not None:
                callback(next(steps_done), t, x, x0)

        if scheduler is not None:
            result = sample_with_scheduler(
                scheduler, model, x_T, num_steps=s.num_inference_steps,
                model_kwargs={"encoder_hidden_states": cond}, generator=generator, init=init, strength=strength,
                mask=mask, callback=on_step, progress=progress,
            )  # fmt: skip
        else:
            result = self._sample(s, model, x_T, cond, init, strength, mask, resample, threshold, generator, on_step,
                                  return_trajectory, progress)  # fmt: skip

        trajectory_x0 = torch.stack(pred_x0) if return_trajectory else None
        if output_type == "latent":
            return PipelineOutput(result.sample, result.trajectory, trajectory_x0)
        images = self.decode(result.sample)
        if pixel_mask is not None and paste_unmasked:
            # The decoder's GroupNorm and attention see the whole latent, so a repainted region moves every
            # pixel a little; the image's own pixels outside the mask are the faithful ones.
            keep = match_batch(1 - (pixel_mask >= 0.5).to(images.dtype), shape[0], num_images_per_prompt, "mask_image")
            original = match_batch(
                pixels.to(images.device, images.dtype) * 2 - 1, shape[0], num_images_per_prompt, "image"
            )
            images = torch.lerp(images, original, keep)
        out = to_pil(images) if output_type == "pil" else to_numpy(images)
        return PipelineOutput(out, result.trajectory, trajectory_x0)

    def _sample(
        self,
        s: SamplingSettings,
        model: Callable[..., torch.Tensor],
        x_T: torch.Tensor,
        cond: torch.Tensor,
        init: torch.Tensor | None,
        strength: float,
        mask: torch.Tensor | None,
        resample: int,
        threshold: Threshold | None,
        generator: torch.Generator | None,
        on_step: StepCallback,
        return_trajectory: bool,
        progress: bool,
    ) -> SampleOutput:
        """Run our sampler: from x_T, or from the init latents noised with x_T to the step `strength` names."""
        schedule = self.noise_schedule
        chain_kwargs = {
            "num_steps": s.num_inference_steps,
            "spacing": schedule.timestep_spacing,
            "steps_offset": schedule.steps_offset,
            "karras_sigmas": s.karras_sigmas,
        }
        start_step = 0
        if init is not None:
            x_T, start_step = sdedit_start(self.diffusion, init, x_T, strength, **chain_kwargs)
        # DDIM alone reads the folder's set_alpha_to_one, as diffusers' DDIMScheduler does.
        ddim_only = {"eta": s.eta, "final_alphabar": schedule.final_alphabar(self.diffusion)}
        return SAMPLER_FUNCTIONS[s.sampler](
            model, self.diffusion, x_T, **chain_kwargs, **(ddim_only if s.sampler == "ddim" else {}),
            model_kwargs={"encoder_hidden_states": cond}, threshold=threshold or schedule.threshold(),
            start_step=start_step,
            inpaint=Inpainting(init, mask, resample) if mask is not None else None, generator=generator,
            return_trajectory=return_trajectory, callback=on_step, progress=progress,
        )  # fmt: skip

    # ---- encoders and inversion ----------------------------------------------------------------------

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The folder's noise process as a diffusers scheduler config: `UniPCMultistepScheduler.from_config(...)`."""
        return self.noise_schedule.to_scheduler_config()

    @torch.inference_mode()
    def encode_prompt(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) text embeddings, (P, L, D) each on the pipeline's device: the prompts', and the
        negative prompts' (or the "" embedding) for guidance. Either can be passed back as prompt_embeds /
        negative_prompt_embeds, e.g. interpolated between two prompts."""
        check_prompts(prompt, negative_prompt)
        cond, uncond = self.text_encoder.encode_for_guidance(prompt, negative_prompt)
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_image(self, image: Any) -> torch.Tensor:
        """Images (PIL, arrays or a (B, 3, H, W) tensor in [0, 1]) -> latents (B, C, H / f, W / f) in diffusion
        scale: the posterior mean times scaling_factor (deterministic, as inversion needs)."""
        pixels = image_batch(image).to(self.vae.device, self.vae.dtype)
        check_sides(self.geometry, pixels.shape[-2], pixels.shape[-1], "image")
        moments = self.vae.encode(pixels * 2 - 1).latent_dist.mean
        return (moments * self.vae.config.scaling_factor).to(self.device, self.dtype)

    @torch.inference_mode()
    def invert(
        self,
        image: Any,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """DDIM inversion: the x_T (B, C, h, w) from which deterministic DDIM with these steps, prompt and guidance
        (`pipe(prompt, latents=x_T, sampler="ddim", eta=0, ...)`) regenerates about `image`. Guidance above 1
        makes the inversion drift (null-text inversion's problem); 1 is the faithful default."""
        s = self.resolve_settings(guidance_scale, num_inference_steps, "ddim", 0.0)
        z0 = self.encode_image(image)
        cond, uncond = self.encode_prompt(prompt, negative_prompt)
        cond = match_batch(cond, z0.shape[0], 1, "prompt")
        model = classifier_free_guidance(self._unet_fn, s.guidance_scale, {"encoder_hidden_states": uncond})
        schedule = self.noise_schedule
        return ddim_invert(
            model, self.diffusion, z0, num_steps=s.num_inference_steps, spacing=schedule.timestep_spacing,
            steps_offset=schedule.steps_offset, model_kwargs={"encoder_hidden_states": cond}, progress=progress,
            final_alphabar=schedule.final_alphabar(self.diffusion),
        ).sample  # fmt: skip

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in diffusion scale (B, C, h, w) -> images (B, 3, h f, w f) in [-1, 1] (not clamped):
        x = D(z / scaling_factor)."""
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample

    def _unet_fn(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample

    def _text_conditioning(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        per_prompt: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond), (B, L, D) each with B = prompts x per_prompt, repeated per image as diffusers does
        (prompt 0's images first)."""
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("prompt: give a prompt (or prompt_embeds)")
            if negative_prompt_embeds is not None:
                raise ValueError("negative_prompt_embeds: needs prompt_embeds; with prompt, use negative_prompt")
            cond, uncond = self.encode_prompt(prompt, negative_prompt)
        else:
            if prompt is not None or negative_prompt is not None:
                raise ValueError("prompt_embeds: give either prompt (and negative_prompt) or the embeddings, not both")
            unconditional = self.text_encoder.unconditional(1) if negative_prompt_embeds is None else None
            cond, uncond = embeddings_for_guidance(
                prompt_embeds, negative_prompt_embeds, unconditional, self.text_encoder.hidden_size
            )
        cond, uncond = (e.to(self.device, self.dtype).repeat_interleave(per_prompt, dim=0) for e in (cond, uncond))
        return cond, uncond

    # ---- argument checks -----------------------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        """The image sizes this pipeline can draw (see `ldm.pipeline_settings.Geometry`)."""
        return Geometry(self.vae_scale_factor, self.size_multiple, self.default_size)

    def resolve_settings(
        self,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        karras_sigmas: bool | None = None,
    ) -> SamplingSettings:
        """The settings a call with these arguments samples with: None -> the folder's defaults (sizes: the
        U-Net's). Raises ValueError naming the first invalid argument."""
        return resolve_settings(
            self.defaults, self.noise_schedule, self.geometry,
            guidance_scale, num_inference_steps, sampler, eta, height, width, karras_sigmas,
        )  # fmt: skip

    def _scheduler_for(self, scheduler: object) -> SchedulerMixin:
        """`scheduler` itself, or a scheduler class built from the folder's config; it must predict what the
        U-Net predicts."""
        if isinstance(scheduler, type) and issubclass(scheduler, SchedulerMixin):
            scheduler = scheduler.from_config(self.scheduler_config)
        return check_scheduler(scheduler, DIFFUSERS_PREDICTION_NAMES[self.noise_schedule.prediction])
