"""The diffusion math: schedules, forward process, posteriors, losses, the bound and samplers.

It imports torch, numpy, einops and tqdm (progress bars) only, and knows no network: models are callables
`model(x_t, t, **kwargs)`. `SAMPLERS` (ldm.diffusion.sampler_table) names every sampler the pipeline runs.
"""

from ldm.diffusion.consistency import (
    consistency_denoise,
    consistency_scalings,
    guidance_scale_embedding,
    lcm_timesteps,
    sample_lcm,
)
from ldm.diffusion.dpm_solver import dpmpp_2m_step, sample_dpmpp_2m, sample_dpmpp_2m_sde
from ldm.diffusion.gaussian_diffusion import GaussianDiffusion, PMeanVariance, Prediction, Variance
from ldm.diffusion.guidance import classifier_free_guidance, rescale_guidance
from ldm.diffusion.inpainting import Inpainting
from ldm.diffusion.interpolation import slerp
from ldm.diffusion.inversion import ddim_invert
from ldm.diffusion.likelihood import discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl
from ldm.diffusion.losses import min_snr_weight, training_losses
from ldm.diffusion.sampler_table import SAMPLER_NAMES, SAMPLERS, Sampler
from ldm.diffusion.samplers import (
    SampleOutput,
    ddim_step,
    ddpm_step,
    run_chain,
    sample_ddim,
    sample_ddpm,
    sample_euler_ancestral,
    sampling_chain,
)
from ldm.diffusion.schedules import (
    DIFFUSERS_SCHEDULE_NAMES,
    karras_noise_levels,
    make_beta_schedule,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)
from ldm.diffusion.sdedit import sdedit_start, sdedit_start_on
from ldm.diffusion.thresholding import DynamicThreshold, StaticThreshold
from ldm.diffusion.timesteps import TIMESTEP_SAMPLINGS, logit_normal_probabilities, sample_timesteps
from ldm.diffusion.vlb import BoundTerms, bits_per_dim, prior_bpd, vlb_terms_bpd

__all__ = [
    "DIFFUSERS_SCHEDULE_NAMES",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "TIMESTEP_SAMPLINGS",
    "BoundTerms",
    "DynamicThreshold",
    "GaussianDiffusion",
    "Inpainting",
    "PMeanVariance",
    "Prediction",
    "SampleOutput",
    "Sampler",
    "StaticThreshold",
    "Variance",
    "bits_per_dim",
    "classifier_free_guidance",
    "consistency_denoise",
    "consistency_scalings",
    "ddim_invert",
    "ddim_step",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "dpmpp_2m_step",
    "gaussian_log_likelihood",
    "guidance_scale_embedding",
    "karras_noise_levels",
    "lcm_timesteps",
    "logit_normal_probabilities",
    "make_beta_schedule",
    "min_snr_weight",
    "normal_kl",
    "prior_bpd",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "run_chain",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler_ancestral",
    "sample_lcm",
    "sample_timesteps",
    "sampling_chain",
    "sdedit_start",
    "sdedit_start_on",
    "slerp",
    "spaced_timesteps",
    "training_losses",
    "vlb_terms_bpd",
]
