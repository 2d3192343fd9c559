"""Noise schedules: beta_t for t = 0 .. T-1, and the timestep subsets samplers walk."""

from __future__ import annotations

import math

import numpy as np

# Our schedule names and the `beta_schedule` string diffusers' scheduler configs use for each.
DIFFUSERS_SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SCHEDULE_NAMES = tuple(DIFFUSERS_SCHEDULE_NAMES)
SPACINGS = ("leading", "trailing", "linspace")


def make_beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    *,
    zero_terminal_snr: bool = False,
) -> np.ndarray:
    """Return the float64 betas of a named schedule.

    - `linear`: beta_t linear from 1e-4 to 0.02 (Ho et al. 2020).
    - `scaled_linear`: sqrt(beta_t) linear from sqrt(0.00085) to sqrt(0.012) (Stable Diffusion).
    - `cosine`: alphabar(t) = f(t)/f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2, s = 0.008, and
      beta_t = 1 - alphabar(t+1)/alphabar(t) clipped at 0.999 (Nichol & Dhariwal 2021).
      diffusers calls it `squaredcos_cap_v2`, which is accepted as an alias.
    With `zero_terminal_snr`, the schedule is rescaled so alphabar_{T-1} = 0 (Lin et al. 2023).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "squaredcos_cap_v2":
        name = "cosine"
    if name == "linear":
        start = 1e-4 if beta_start is None else beta_start
        end = 0.02 if beta_end is None else beta_end
        betas = np.linspace(start, end, num_timesteps, dtype=np.float64)
    elif name == "scaled_linear":
        start = 0.00085 if beta_start is None else beta_start
        end = 0.012 if beta_end is None else beta_end
        betas = np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "cosine":
        betas = _cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    def alphabar(u: float) -> float:  # f(u T)/f(0) up to the constant f(0), which cancels in the ratio
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    betas = [1 - alphabar((i + 1) / num_timesteps) / alphabar(i / num_timesteps) for i in steps]
    return np.minimum(np.array(betas, dtype=np.float64), max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphabar) so its last value is 0 and its first is unchanged (Lin et al. 2023)."""
    sqrt_alphabar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_alphabar[0], sqrt_alphabar[-1]
    sqrt_alphabar = (sqrt_alphabar - last) * first / (first - last)
    alphabar = sqrt_alphabar**2
    alphas = np.concatenate([alphabar[:1], alphabar[1:] / alphabar[:-1]])
    return 1.0 - alphas


def karras_noise_levels(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """The noise levels of Karras et al. 2022 (eq. 5), descending from sigma_max to sigma_min:
    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. n-1.

    sigma is the variance-exploding noise level sqrt((1 - alphabar) / alphabar); rho = 7 spends more of the
    steps at low noise than a uniform spacing of timesteps does.
    """
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"karras sigmas need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, num_steps) if num_steps > 1 else np.zeros(1)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def spaced_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """The `num_steps` timesteps a sampler visits, in descending order, as diffusers spaces them.

    - `leading`: 0, k, 2k, ... with k = T // num_steps (plus `steps_offset`), as in DDIM's paper.
    - `trailing`: T-1, T-1-k, ... with k = T / num_steps; always starts at the last timestep.
    - `linspace`: num_steps points evenly from 0 to T-1, rounded.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if num_steps == num_train_timesteps:
        # The full chain visits every timestep T-1 .. 0 (DDPM as trained): there is nothing to offset
        # (diffusers' schedulers refuse this case rather than shift past T-1).
        steps_offset = 0
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        timesteps = np.arange(num_steps) * ratio + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    elif spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_steps).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    timesteps = np.unique(timesteps.astype(np.int64))[::-1].copy()
    if timesteps[0] >= num_train_timesteps or timesteps[-1] < 0:
        raise ValueError(f"steps_offset={steps_offset} moves the timesteps outside [0, {num_train_timesteps})")
    return timesteps
