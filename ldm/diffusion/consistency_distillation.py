"""The pieces of latent consistency distillation (Luo et al. 2023, Algorithm 1) that are math: the skip-step grid
the teacher's ODE solver walks, one guided DDIM step of the teacher on it, and the consistency loss.

They follow diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py (`DDIMSolver`, the guided
teacher step, the pseudo-Huber loss), written over our `GaussianDiffusion`, so any prediction type it supports
(eps, v, x0) and a zero-terminal-SNR schedule distil the same way. The boundary condition (c_skip, c_out) is
`ldm.diffusion.consistency`'s, shared with the LCM sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.diffusion.consistency import lcm_origin_timesteps
from ldm.diffusion.gaussian_diffusion import GaussianDiffusion


@dataclass(frozen=True)
class SkipStepGrid:
    """The N timesteps t_n = (n + 1) T / N - 1 (n = 0 .. N - 1) of the distillation, each with the one k = T / N
    below it that the teacher's step reaches (t_{n-1}; 0 below the first). LCMScheduler's `original_inference_steps`
    grid is the same, so the student is trained on exactly the timesteps it is sampled at."""

    timesteps: torch.Tensor  # (N,) int64
    previous: torch.Tensor  # (N,) int64: timesteps - k, clamped at 0

    @classmethod
    def build(cls, num_train_timesteps: int, num_steps: int, device: torch.device | str = "cpu") -> SkipStepGrid:
        if not 2 <= num_steps <= num_train_timesteps:
            raise ValueError(
                f"distill.ddim_timesteps: {num_steps} must be between 2 and the teacher's {num_train_timesteps} "
                "training timesteps"
            )
        if num_train_timesteps % num_steps:
            raise ValueError(
                f"distill.ddim_timesteps: {num_steps} does not divide the teacher's {num_train_timesteps} training "
                "timesteps, so the skip k = T / N would not be whole (LCMScheduler's grid needs it); e.g. 50 for 1000"
            )
        timesteps = torch.from_numpy(lcm_origin_timesteps(num_train_timesteps, num_steps)).to(device)
        return cls(timesteps, (timesteps - num_train_timesteps // num_steps).clamp(min=0))

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n) for `batch` indices drawn uniformly, on the grid's device."""
        index = torch.randint(0, len(self.timesteps), (batch,), device=self.timesteps.device, generator=generator)
        return self.timesteps[index], self.previous[index]


def guided_prediction(
    diffusion: GaussianDiffusion,
    conditional: torch.Tensor,
    unconditional: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    guidance_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided (x0, eps) from the teacher's two outputs at x_t: each of x0 and eps is u + w (c - u), per example w
    (B,). Guiding both keeps them one consistent pair, as diffusers' LCM script does (guiding the raw output and
    converting is the same for eps and x0 prediction, and for v too since the conversions are linear in it)."""
    w = guidance_scale.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    x0_c, eps_c = diffusion.predict_x0_eps(diffusion.split_output(conditional)[0], x_t, t)
    x0_u, eps_u = diffusion.predict_x0_eps(diffusion.split_output(unconditional)[0], x_t, t)
    return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


def ddim_step_to(
    diffusion: GaussianDiffusion, pred_x0: torch.Tensor, pred_eps: torch.Tensor, t_prev: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from a (x0, eps) pair to timestep t_prev: sqrt(abar) x0 + sqrt(1 - abar) eps."""
    c = diffusion.coefficients(t_prev.device)
    return (
        diffusion.gather(c.sqrt_alphas_cumprod, t_prev, pred_x0) * pred_x0
        + diffusion.gather(c.sqrt_one_minus_alphas_cumprod, t_prev, pred_x0) * pred_eps
    )


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """The batch mean of d(prediction, target): "l2" the squared error, "huber" the pseudo-Huber
    sqrt(d^2 + c^2) - c per element (LCM's choice: quadratic near 0, linear for outliers)."""
    difference = prediction.float() - target.float()
    if kind == "l2":
        return difference.square().mean()
    if kind == "huber":
        return (torch.sqrt(difference.square() + huber_c**2) - huber_c).mean()
    raise ValueError(f"distill.loss: {kind!r} is not huber or l2")
