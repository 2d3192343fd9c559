"""The Gaussian diffusion process: forward marginals, posteriors and the reverse-process parameterization.

Indexing follows diffusers: t = 0 .. T-1, and `alphabar_prev` at t = 0 is 1. Every schedule array is
computed once in float64; values gathered at t are cast to the dtype of the tensor they multiply.
The arrays are copied to a device once (`GaussianDiffusion.to`, or at the first use there) and gathered
there, so no step copies anything from the host or waits for it.
The network is only ever a tensor (`model_output`): this module knows no model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from ldm.diffusion.schedules import make_beta_schedule
from ldm.diffusion.thresholding import Threshold


class Prediction(str, enum.Enum):
    """What the network predicts: the noise eps, the clean sample x0, or v = sqrt(abar) eps - sqrt(1-abar) x0."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


class Variance(str, enum.Enum):
    """The reverse-process variance: beta~_t, beta_t, or a learned log-space interpolation of the two."""

    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"


class PMeanVariance(NamedTuple):
    """p(x_{t-1} | x_t): its mean and variance, and the x0 / eps the network's output implies."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


@dataclass(frozen=True)
class _Coefficients:
    """float64 schedule arrays, one value per timestep index."""

    betas: torch.Tensor
    log_betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    one_minus_alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas_large: torch.Tensor  # fixed_large's log variance: log beta_t, with beta~_1 at t = 0
    snr: torch.Tensor

    def to(self, device: torch.device) -> _Coefficients:
        """A copy on `device`. MPS has no float64, so there the arrays are rounded to float32 (after being
        computed in float64); elsewhere float64 is kept for the formulas that cancel in low precision."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return _Coefficients(**{f.name: getattr(self, f.name).to(device, dtype) for f in fields(self)})


class _OnDevice(NamedTuple):
    """The schedule's arrays copied to one device."""

    coef: _Coefficients
    timesteps: torch.Tensor  # (T,) int64 (float32 when fractional): the timestep value the network sees at each index


def _model_timesteps(timesteps: np.ndarray | list[int] | list[float]) -> np.ndarray:
    """The timesteps told to the network: int64, or float32 when some are fractional (diffusers' Euler schedulers
    tell a U-Net t = 946.42 on `linspace` spacing, as a float32 tensor)."""
    values = np.asarray(timesteps)
    if np.issubdtype(values.dtype, np.floating) and (values != np.round(values)).any():
        return values.astype(np.float32)
    return values.astype(np.int64)


def _coefficients(betas: np.ndarray, final_alphabar: float = 1.0) -> _Coefficients:
    alphas = 1.0 - betas
    abar = final_alphabar * np.cumprod(alphas)
    abar_prev = np.append(final_alphabar, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta~_0 = 0, so its log is clipped to the value at t = 1 (the variance is only used for t >= 1).
    first_nonzero = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first_nonzero, posterior_variance[1:]))
    with np.errstate(divide="ignore"):  # a zero-terminal-SNR schedule has abar_{T-1} = 0
        snr = abar / (1.0 - abar)
        log_one_minus_abar = np.log(1.0 - abar)
    arrays = {
        "betas": betas,
        "log_betas": np.log(np.maximum(betas, np.finfo(np.float64).tiny)),  # beta_0 = 0: see `at_levels`
        "alphas_cumprod": abar,
        "one_minus_alphas_cumprod": 1.0 - abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": log_one_minus_abar,
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        "log_betas_large": np.log(np.append(first_nonzero, betas[1:])),
        "snr": snr,
    }
    return _Coefficients(**{k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()})


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion process over T steps, built from its betas.

    `timesteps` are the timestep values the network is conditioned on, one per index; they differ from
    0 .. T-1 only in a respaced process (see `respaced`), which samples over a subset of a longer chain, and are
    fractional only at levels between a chain's timesteps (`at_levels`, Euler ancestral on `linspace` spacing).
    `coef` holds the arrays on the host; `coefficients(device)` the same arrays on a device, copied once.
    """

    def __init__(
        self,
        betas: np.ndarray | torch.Tensor,
        prediction: Prediction | str = Prediction.EPS,
        variance: Variance | str = Variance.FIXED_SMALL,
        timesteps: np.ndarray | None = None,
        final_alphabar: float = 1.0,
    ) -> None:
        betas = np.asarray(betas.cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas[1:] > 0).all() and betas[0] >= 0 and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1] (beta_0 in [0, 1])")
        if not 0 < final_alphabar <= 1:
            raise ValueError(f"final_alphabar must lie in (0, 1], got {final_alphabar}")
        self.prediction = Prediction(prediction)
        self.variance = Variance(variance)
        self.num_timesteps = len(betas)
        self.timesteps = np.arange(len(betas)) if timesteps is None else _model_timesteps(timesteps)
        if self.timesteps.shape != betas.shape:
            raise ValueError("timesteps must have one entry per beta")
        self.final_alphabar = float(final_alphabar)
        self.coef = _coefficients(betas, self.final_alphabar)
        self._on_device = {self.coef.betas.device: _OnDevice(self.coef, torch.from_numpy(self.timesteps))}

    @classmethod
    def from_schedule(
        cls,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        prediction: Prediction | str = Prediction.EPS,
        variance: Variance | str = Variance.FIXED_SMALL,
        *,
        zero_terminal_snr: bool = False,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ) -> GaussianDiffusion:
        """Build the process from a named schedule (see `make_beta_schedule`)."""
        if zero_terminal_snr and Prediction(prediction) is Prediction.EPS:
            raise ValueError("zero_terminal_snr needs prediction 'v' or 'x0': eps cannot recover x0 at SNR 0")
        betas = make_beta_schedule(schedule, num_timesteps, beta_start, beta_end, zero_terminal_snr=zero_terminal_snr)
        return cls(betas, prediction, variance)

    def respaced(self, timesteps: np.ndarray | list[int], final_alphabar: float = 1.0) -> GaussianDiffusion:
        """The process that visits only `timesteps` (a subset of this one's), as improved-diffusion respaces.

        Its alphabar values are this chain's at those timesteps, so each step's beta is
        1 - alphabar_t / alphabar_prev with alphabar_prev taken at the previous timestep of the subset.
        """
        keep = np.unique(np.asarray(timesteps, dtype=np.int64))  # ascending
        if keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got {keep[0]}..{keep[-1]}")
        return self.at_levels(self.coef.alphas_cumprod.numpy()[keep], self.timesteps[keep], final_alphabar)

    def at_levels(
        self, alphas_cumprod: np.ndarray, timesteps: np.ndarray, final_alphabar: float = 1.0
    ) -> GaussianDiffusion:
        """The process whose index i has noise level `alphas_cumprod[i]` (ascending noise) and whose network
        is told `timesteps[i]`: beta_i = 1 - alphabar_i / alphabar_{i-1}, with alphabar_{-1} = 1.

        `respaced` is the case of levels taken from this chain; Karras sigmas are levels between its timesteps,
        each told to the network as the nearest one. The last reverse step lands on `final_alphabar`: 1, or
        Stable Diffusion's alphabar_0 (`set_alpha_to_one: false`), where a chain that visits t = 0 takes a last
        step of beta 0 (DDIM then returns x as it is, as diffusers does).
        """
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or len(abar) == 0 or not (np.diff(abar) < 0).all():
            raise ValueError("alphas_cumprod must be a non-empty, strictly decreasing 1-D array")
        betas = 1.0 - abar / np.append(final_alphabar, abar[:-1])
        return GaussianDiffusion(betas, self.prediction, self.variance, timesteps, final_alphabar)

    # ---- the arrays on a device ----------------------------------------------------------------------

    def to(self, device: str | torch.device) -> GaussianDiffusion:
        """Copy the schedule arrays to `device` now, rather than in the first step that uses them there;
        returns self. The host arrays (`coef`) stay, and so do copies on other devices."""
        self._arrays_on(torch.empty(0, device=device).device)  # "cuda" -> "cuda:0", as tensors there report it
        return self

    def coefficients(self, device: torch.device) -> _Coefficients:
        """The schedule arrays on `device`: copied from the host on first use there, then reused."""
        return self._arrays_on(device).coef

    def _arrays_on(self, device: torch.device) -> _OnDevice:
        if device not in self._on_device:
            timesteps = torch.from_numpy(self.timesteps).to(device)
            self._on_device[device] = _OnDevice(self.coef.to(device), timesteps)
        return self._on_device[device]

    @staticmethod
    def gather(array: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """array[t] for each batch element, cast to like's dtype and shaped to broadcast against it.

        `array` must be on t's device (take it from `coefficients(t.device)`): indexing across devices
        would copy the array, or t, in every step.
        """
        if array.device != t.device:
            raise ValueError(f"gather: the schedule array is on {array.device} but t is on {t.device}")
        values = array[t].to(like.dtype)
        return values.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the network sees for indices t (identity unless respaced)."""
        return self._arrays_on(t.device).timesteps[t]

    # ---- forward process -----------------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I): mean, variance, log variance."""
        c = self.coefficients(t.device)
        mean = self.gather(c.sqrt_alphas_cumprod, t, x0) * x0
        variance = self.gather(c.one_minus_alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self.gather(c.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        c = self.coefficients(t.device)
        return (
            self.gather(c.sqrt_alphas_cumprod, t, x0) * x0 + self.gather(c.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(c1 x0 + c2 x_t, beta~_t): mean, variance, clipped log variance.

        c1 = sqrt(abar_{t-1}) beta_t / (1 - abar_t), c2 = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
        beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
        """
        c = self.coefficients(t.device)
        mean = self.gather(c.posterior_mean_coef1, t, x_t) * x0 + self.gather(c.posterior_mean_coef2, t, x_t) * x_t
        variance = self.gather(c.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.gather(c.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- parameterizations: exact conversions between eps, x0 and v ---------------------------------

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        c = self.coefficients(t.device)
        return (x_t - self.gather(c.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self.gather(
            c.sqrt_alphas_cumprod, t, x_t
        )

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        c = self.coefficients(t.device)
        return (x_t - self.gather(c.sqrt_alphas_cumprod, t, x_t) * x0) / self.gather(
            c.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def v_from_x0_eps(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
        c = self.coefficients(t.device)
        return (
            self.gather(c.sqrt_alphas_cumprod, t, x0) * eps - self.gather(c.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        c = self.coefficients(t.device)
        return (
            self.gather(c.sqrt_alphas_cumprod, t, x_t) * x_t - self.gather(c.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        c = self.coefficients(t.device)
        return (
            self.gather(c.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + self.gather(c.sqrt_alphas_cumprod, t, x_t) * v
        )

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is regressed onto: eps, x0 or v."""
        if self.prediction is Prediction.EPS:
            return noise
        if self.prediction is Prediction.X0:
            return x0
        return self.v_from_x0_eps(x0, t, noise)

    def predict_x0_eps(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x0, eps) pair implied by the network's mean prediction."""
        if self.prediction is Prediction.EPS:
            return self.x0_from_eps(x_t, t, prediction), prediction
        if self.prediction is Prediction.X0:
            return prediction, self.eps_from_x0(x_t, t, prediction)
        return self.x0_from_v(x_t, t, prediction), self.eps_from_v(x_t, t, prediction)

    # ---- reverse process -----------------------------------------------------------------------------

    @property
    def output_channels_factor(self) -> int:
        """How many times the data's channels the network outputs (2 when it also predicts the variance)."""
        return 2 if self.variance is Variance.LEARNED_RANGE else 1

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a learned-range output (B, 2C, ...) into the mean prediction and the variance values v."""
        if self.variance is not Variance.LEARNED_RANGE:
            return model_output, None
        if model_output.shape[1] % 2:
            raise ValueError(f"learned_range needs an even channel count, got output shape {tuple(model_output.shape)}")
        prediction, var_values = model_output.chunk(2, dim=1)
        return prediction, var_values

    def model_log_variance(
        self, t: torch.Tensor, like: torch.Tensor, var_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log Sigma_t: log beta~_t (fixed_small), log beta_t (fixed_large), or for learned_range
        v log beta_t + (1 - v) log beta~_t with v = (output + 1) / 2 (Nichol & Dhariwal 2021)."""
        c = self.coefficients(t.device)
        if self.variance is Variance.FIXED_SMALL:
            return self.gather(c.posterior_log_variance_clipped, t, like).expand_as(like)
        if self.variance is Variance.FIXED_LARGE:
            return self.gather(c.log_betas_large, t, like).expand_as(like)
        if var_values is None:
            raise ValueError("learned_range needs the variance half of the model output")
        min_log = self.gather(c.posterior_log_variance_clipped, t, like)
        max_log = self.gather(c.log_betas, t, like)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        threshold: Threshold | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t): mean = posterior mean at the predicted x0 (after thresholding), and Sigma_t."""
        prediction, var_values = self.split_output(model_output)
        pred_x0, pred_eps = self.predict_x0_eps(prediction, x_t, t)
        if threshold is not None:
            pred_x0 = threshold(pred_x0)
            pred_eps = self.eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        log_variance = self.model_log_variance(t, x_t, var_values)
        return PMeanVariance(mean, torch.exp(log_variance), log_variance, pred_x0, pred_eps)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = abar_t / (1 - abar_t), as a float32 tensor of shape (B,)."""
        return self.coefficients(t.device).snr[t].float()
