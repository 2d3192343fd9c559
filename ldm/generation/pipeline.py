"""Text to image: `LatentDiffusionPipeline`, our samplers and classifier-free guidance over a diffusers folder.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/quickstart/pipeline")
    images = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0)).images
    faster = pipe("a red circle", sampler="dpmpp_2m", num_inference_steps=15).images
    edited = pipe("a red circle on a blue background", image=images[0], strength=0.6).images
    x_T = pipe.invert(images[0], "a red circle")  # pipe(..., latents=x_T, sampler="ddim", eta=0) redraws it

A call builds a `GenerationRequest` (ldm.generation.request), resolves it against the folder's defaults and
runs it (ldm.generation.run); `pipe.generate(request)` takes a request directly.

A downloaded Stable Diffusion folder's scheduler config is read whole: `set_alpha_to_one` (where DDIM's last
step lands), `clip_sample` / `thresholding` (the default clipping of x0), spacing, offset, zero-SNR rescaling
and prediction type; its DDIM draws what diffusers' DDIMScheduler draws from that config (tests/pipeline/
test_sd_folders.py). The folder is a Stable Diffusion pipeline folder (see `ldm.generation.model_folder`), so
`diffusers.StableDiffusionPipeline.from_pretrained` loads it too and, with the same scheduler, steps, guidance
scale and seed, draws the same images (float32 CPU: to ~1e-6 of the latents' scale). Two
deliberate differences from diffusers: guidance 0 <= w < 1 is applied as written (w = 0 samples the
unconditional model) where diffusers switches guidance off for w <= 1; and with `trailing` or `linspace`
timestep spacing each DDIM step goes to the previous timestep of the subset (DESIGN.md), where diffusers'
DDIMScheduler goes to t - T // n, so only the default `leading` spacing draws identical images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from conditioning import TextEncoder
from ldm.diffusion import classifier_free_guidance, ddim_invert, guidance_scale_embedding
from ldm.diffusion.samplers import ModelFn
from ldm.generation.checks import Geometry, check_sides
from ldm.generation.inputs import check_prompts, embeddings_for_guidance, image_batch, match_batch
from ldm.generation.lora_weights import load_unet_lora
from ldm.generation.model_folder import (
    SamplingDefaults,
    check_model_folder,
    loading,
    read_scheduler_config,
    text_positions,
    write_model_index,
    write_scheduler_config,
)
from ldm.generation.noise_schedule import NoiseScheduleConfig
from ldm.generation.request import GenerationRequest, ModelFacts
from ldm.generation.run import PipelineOutput, run

__all__ = ["GenerationRequest", "LatentDiffusionPipeline", "PipelineOutput", "SamplingDefaults"]


class LatentDiffusionPipeline:
    """A text-conditioned latent diffusion model: VAE, text encoder, U-Net and the noise process.

    Sampling: z_T ~ N(0, I) of shape (B, C, height / f, width / f) with f the VAE's downsampling factor;
    each step evaluates eps~ = eps_u + w (eps_c - eps_u) in one batched U-Net pass over [uncond; cond]
    (a single conditional pass when w = 1; for a U-Net that takes w as an input, a distilled student, a single
    conditional pass given w's embedding, see `guided_model`) and applies the chosen sampler's update; finally
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
        """Write the model folder (see `ldm.generation.model_folder`): safetensors weights and diffusers configs."""
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
        (the file, or a folder holding it; see `ldm.generation.lora_weights`); several adapters add up. Returns its
        name."""
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

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        **options: Any,
    ) -> PipelineOutput:
        """Generate `num_images_per_prompt` images per prompt (or per row of `prompt_embeds`), diffusers-style:
        `pipe(prompt, num_inference_steps=..., guidance_scale=..., sampler=..., image=..., ...)`.

        Every keyword is a field of `GenerationRequest` (its docs say what each does); None means the folder's
        `SamplingDefaults`, the U-Net's size or the init image's. Invalid arguments raise ValueError naming the
        argument, before any sampling work; an unknown keyword is a TypeError.
        """
        request = GenerationRequest(prompt, negative_prompt, guidance_scale=guidance_scale,
                                    num_inference_steps=num_inference_steps, **options)  # fmt: skip
        return self.generate(request)

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> PipelineOutput:
        """Resolve `request` against this model (ValueError naming a bad field) and draw it."""
        return run(self, self.resolve(request))

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with the folder's defaults filled in and every field checked (see GenerationRequest.resolve)."""
        return request.resolve(self.facts)

    @property
    def facts(self) -> ModelFacts:
        """What a request is resolved against: the folder's defaults, noise process, sizes and device."""
        return ModelFacts(self.defaults, self.noise_schedule, self.geometry, self.device, self.guidance_in_unet)

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
        s = self.resolve(GenerationRequest(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                           sampler="ddim", eta=0.0))  # fmt: skip
        z0 = self.encode_image(image)
        cond, uncond = self.encode_prompt(prompt, negative_prompt)
        cond = match_batch(cond, z0.shape[0], 1, "prompt")
        model = self.guided_model(s.guidance_scale, uncond)
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

    @property
    def guidance_in_unet(self) -> bool:
        """Whether the U-Net takes the guidance scale as an input (diffusers' `time_cond_proj_dim`: a guidance-
        distilled student), so that sampling runs one conditional pass per step and no classifier-free guidance."""
        return self.unet.config.time_cond_proj_dim is not None

    def guided_model(self, guidance_scale: float, uncond: torch.Tensor, guidance_rescale: float = 0.0) -> ModelFn:
        """The model a sampler calls as model(x_t, t, encoder_hidden_states=cond): classifier-free guidance at w over
        one batched pass on [uncond; cond] or, for a U-Net that takes w as an input, that U-Net alone given
        `guidance_scale_embedding(w)` as its timestep_cond, one conditional pass per step (as diffusers'
        StableDiffusionPipeline runs a U-Net with time_cond_proj_dim, for any scheduler)."""
        if not self.guidance_in_unet:
            return classifier_free_guidance(
                self._unet_fn, guidance_scale, {"encoder_hidden_states": uncond}, guidance_rescale
            )
        # float64, so w - 1 rounds once as diffusers' torch.tensor(guidance_scale - 1); built on the host as there.
        w = torch.full((1,), guidance_scale, dtype=torch.float64)
        embedding = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim).to(self.device, self.dtype)

        def with_guidance_embedding(x: torch.Tensor, t: torch.Tensor, **cond_kwargs: Any) -> torch.Tensor:
            return self._unet_fn(x, t, timestep_cond=embedding.expand(x.shape[0], -1), **cond_kwargs)

        return with_guidance_embedding

    def _unet_fn(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond).sample

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
        """The image sizes this pipeline can draw (see `ldm.generation.checks.Geometry`)."""
        return Geometry(self.vae_scale_factor, self.size_multiple, self.default_size)
