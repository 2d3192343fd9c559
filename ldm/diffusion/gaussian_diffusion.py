"""The Gaussian diffusion process: forward marginals, posteriors and the reverse-process parameterization.

Indexing follows diffusers: t = 0 .. T-1, and `alphabar_prev` at t = 0 is 1. Every schedule array is
computed once in float64; values gathered at t are cast to the dtype of the tensor they multiply.
The network is only ever a tensor (`model_output`): this module knows no model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
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
    alphas_cumprod: torch.Tensor
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


def _coefficients(betas: np.ndarray) -> _Coefficients:
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta~_0 = 0, so its log is clipped to the value at t = 1 (the variance is only used for t >= 1).
    first_nonzero = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first_nonzero, posterior_variance[1:]))
    with np.errstate(divide="ignore"):  # a zero-terminal-SNR schedule has abar_{T-1} = 0
        snr = abar / (1.0 - abar)
        log_one_minus_abar = np.log(1.0 - abar)
    arrays = {
        "betas": betas,
        "alphas_cumprod": abar,
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
    0 .. T-1 only in a respaced process (see `respaced`), which samples over a subset of a longer chain.
    """

    def __init__(
        self,
        betas: np.ndarray | torch.Tensor,
        prediction: Prediction | str = Prediction.EPS,
        variance: Variance | str = Variance.FIXED_SMALL,
        timesteps: np.ndarray | None = None,
    ) -> None:
        betas = np.asarray(betas.cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.prediction = Prediction(prediction)
        self.variance = Variance(variance)
        self.num_timesteps = len(betas)
        self.timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        if self.timesteps.shape != betas.shape:
            raise ValueError("timesteps must have one entry per beta")
        self.coef = _coefficients(betas)

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

    def respaced(self, timesteps: np.ndarray | list[int]) -> GaussianDiffusion:
        """The process that visits only `timesteps` (a subset of this one's), as improved-diffusion respaces.

        Its alphabar values are this chain's at those timesteps, so each step's beta is
        1 - alphabar_t / alphabar_prev with alphabar_prev taken at the previous timestep of the subset.
        """
        keep = np.unique(np.asarray(timesteps, dtype=np.int64))  # ascending
        if keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got {keep[0]}..{keep[-1]}")
        abar = self.coef.alphas_cumprod.numpy()[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.prediction, self.variance, timesteps=self.timesteps[keep])

    # ---- gathering schedule values -----------------------------------------------------------------

    @staticmethod
    def gather(array: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """array[t] for each batch element, cast to like's dtype and shaped to broadcast against it."""
        values = array.to(t.device)[t].to(like.dtype)
        return values.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the network sees for indices t (identity unless respaced)."""
        return torch.as_tensor(self.timesteps, device=t.device)[t]

    # ---- forward process -----------------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I): mean, variance, log variance."""
        mean = self.gather(self.coef.sqrt_alphas_cumprod, t, x0) * x0
        variance = self.gather(1.0 - self.coef.alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self.gather(self.coef.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (
            self.gather(self.coef.sqrt_alphas_cumprod, t, x0) * x0
            + self.gather(self.coef.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(c1 x0 + c2 x_t, beta~_t): mean, variance, clipped log variance.

        c1 = sqrt(abar_{t-1}) beta_t / (1 - abar_t), c2 = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
        beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
        """
        mean = (
            self.gather(self.coef.posterior_mean_coef1, t, x_t) * x0
            + self.gather(self.coef.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.gather(self.coef.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.gather(self.coef.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- parameterizations: exact conversions between eps, x0 and v ---------------------------------

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (x_t - self.gather(self.coef.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self.gather(
            self.coef.sqrt_alphas_cumprod, t, x_t
        )

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        return (x_t - self.gather(self.coef.sqrt_alphas_cumprod, t, x_t) * x0) / self.gather(
            self.coef.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def v_from_x0_eps(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
        return (
            self.gather(self.coef.sqrt_alphas_cumprod, t, x0) * eps
            - self.gather(self.coef.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (
            self.gather(self.coef.sqrt_alphas_cumprod, t, x_t) * x_t
            - self.gather(self.coef.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        return (
            self.gather(self.coef.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + self.gather(self.coef.sqrt_alphas_cumprod, t, x_t) * v
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
        if self.variance is Variance.FIXED_SMALL:
            return self.gather(self.coef.posterior_log_variance_clipped, t, like).expand_as(like)
        if self.variance is Variance.FIXED_LARGE:
            return self.gather(self.coef.log_betas_large, t, like).expand_as(like)
        if var_values is None:
            raise ValueError("learned_range needs the variance half of the model output")
        min_log = self.gather(self.coef.posterior_log_variance_clipped, t, like)
        max_log = self.gather(torch.log(self.coef.betas), t, like)
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
        return self.coef.snr.to(t.device)[t].float()
