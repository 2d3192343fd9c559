"""The diffusion math: schedules, forward process, posteriors, losses, the bound and samplers.

It imports torch only and knows no network: models are callables `model(x_t, t, **kwargs)`.
"""

from ldm.diffusion.gaussian_diffusion import GaussianDiffusion, PMeanVariance, Prediction, Variance
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.likelihood import discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl
from ldm.diffusion.losses import min_snr_weight, training_losses
from ldm.diffusion.samplers import SampleOutput, ddim_step, ddpm_step, sample_ddim, sample_ddpm, sampling_chain
from ldm.diffusion.schedules import (
    DIFFUSERS_SCHEDULE_NAMES,
    make_beta_schedule,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)
from ldm.diffusion.thresholding import DynamicThreshold, StaticThreshold
from ldm.diffusion.timesteps import TIMESTEP_SAMPLINGS, logit_normal_probabilities, sample_timesteps
from ldm.diffusion.vlb import BoundTerms, bits_per_dim, prior_bpd, vlb_terms_bpd

__all__ = [
    "DIFFUSERS_SCHEDULE_NAMES",
    "TIMESTEP_SAMPLINGS",
    "BoundTerms",
    "DynamicThreshold",
    "GaussianDiffusion",
    "PMeanVariance",
    "Prediction",
    "SampleOutput",
    "StaticThreshold",
    "Variance",
    "bits_per_dim",
    "classifier_free_guidance",
    "ddim_step",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "logit_normal_probabilities",
    "make_beta_schedule",
    "min_snr_weight",
    "normal_kl",
    "prior_bpd",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_timesteps",
    "sampling_chain",
    "spaced_timesteps",
    "training_losses",
    "vlb_terms_bpd",
]
