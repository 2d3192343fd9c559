"""No host round trips inside a sampling step, counted on the CPU (tests/host_round_trips.py).

A step that asks the host for a value (`.item()`, `bool(t)`) stalls a GPU until its queue drains; a
step that builds a tensor from host data or copies a schedule array to the device adds a host-to-device
copy. On the CPU neither costs anything, so these tests count the ops instead of timing them; the meta
device stands in for an accelerator, where a CPU-to-device copy shows as a cross-device copy.
"""

import contextlib
from collections import Counter

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    DynamicThreshold,
    GaussianDiffusion,
    Inpainting,
    StaticThreshold,
    ddim_invert,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler_ancestral,
    sample_lcm,
)
from tests.host_round_trips import HostRoundTrips, StepWindows


def stand_in_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A network stand-in that uses t as a U-Net does (as a float per sample) and runs on any device."""
    scale = 1 + t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) / 1000
    return 0.5 * torch.tanh(x) * scale


def learned_range_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`stand_in_model`'s output and a variance half in [-1, 1]: twice the input's channels."""
    out = stand_in_model(x, t)
    return torch.cat([out, out.tanh()], dim=1)


SAMPLERS = {
    "ddim": lambda model, d, x, **kw: sample_ddim(model, d, x, num_steps=3, **kw),
    "ddim_eta1": lambda model, d, x, **kw: sample_ddim(model, d, x, num_steps=3, eta=1.0, **kw),
    "ddpm": lambda model, d, x, **kw: sample_ddpm(model, d, x, num_steps=3, **kw),
    "dpmpp_2m": lambda model, d, x, **kw: sample_dpmpp_2m(model, d, x, num_steps=3, **kw),
    "dpmpp_2m_sde_karras": lambda model, d, x, **kw: sample_dpmpp_2m_sde(
        model, d, x, num_steps=3, karras_sigmas=True, **kw
    ),
    "euler_ancestral": lambda model, d, x, **kw: sample_euler_ancestral(model, d, x, num_steps=3, **kw),
    "lcm": lambda model, d, x, **kw: sample_lcm(model, d, x, num_steps=3, **kw),
    "dpmpp_2m_inpainting": lambda model, d, x, **kw: sample_dpmpp_2m(
        model, d, x, num_steps=3, inpaint=Inpainting(torch.zeros_like(x), torch.zeros_like(x[:1, :1]), 2), **kw
    ),
}


def count_steps(sampler: str, diffusion: GaussianDiffusion, x_T: torch.Tensor, **kwargs) -> list[HostRoundTrips]:
    """Sample 3 steps and return the round trips of steps 2 and 3 (the first is the warm-up)."""
    model = learned_range_model if diffusion.output_channels_factor == 2 else stand_in_model
    with StepWindows() as windows:
        SAMPLERS[sampler](model, diffusion, x_T, callback=windows, progress=False, **kwargs)
    assert len(windows.steps) == 2
    return windows.steps


# ---- the counter itself ------------------------------------------------------------------------------

ON_CPU = torch.ones(4)
ON_META = torch.ones(4, device="meta")
CPU_INDEX = torch.arange(2)
ZERO_DIM_INDEX = torch.tensor(1)

# Known-bad snippets and the kind of round trip each is.
ROUND_TRIPS = {
    "item": (lambda: ON_CPU.sum().item(), "syncs"),
    "bool": (lambda: bool(ON_CPU[0] == 1), "syncs"),
    "float": (lambda: float(ON_CPU[0]), "syncs"),
    "index_with_a_0dim_tensor": (lambda: ON_CPU[ZERO_DIM_INDEX], "syncs"),
    "nonzero": (lambda: ON_CPU.nonzero(), "syncs"),
    "where_of_a_condition": (lambda: torch.where(ON_CPU > 0), "syncs"),
    "boolean_mask": (lambda: ON_CPU[ON_CPU > 0], "syncs"),
    "unique": (lambda: torch.unique(ON_CPU), "syncs"),
    "repeat_interleave_by_a_tensor": (lambda: ON_CPU.repeat_interleave(CPU_INDEX.repeat(2)), "syncs"),
    "equal": (lambda: torch.equal(ON_CPU, ON_CPU), "syncs"),
    "tensor_from_a_list": (lambda: torch.tensor([1.0, 2.0]), "host_data"),
    "tensor_from_a_float": (lambda: torch.tensor(3.0), "host_data"),
    "as_tensor_of_numpy": (lambda: torch.as_tensor(np.arange(3)), "host_data"),
    "to_another_device": (lambda: ON_CPU.to("meta"), "cross_device_copies"),
    "to_a_tensors_device": (lambda: ON_CPU.to(ON_META), "cross_device_copies"),
    "copy_across_devices": (lambda: torch.empty(4, device="meta").copy_(ON_CPU), "cross_device_copies"),
    "index_on_another_device": (lambda: ON_META[CPU_INDEX], "cross_device_copies"),
    "tolist_of_a_device_tensor": (lambda: ON_META.tolist(), "cross_device_copies"),
}
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}  # decomposed / whole composites


@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("snippet", list(ROUND_TRIPS))
def test_counter_counts_each_kind_of_round_trip(snippet, grad_mode):
    """Each known-bad snippet is counted under its kind and no other, so the zero counts below can fail."""
    run, kind = ROUND_TRIPS[snippet]
    # Reading a meta tensor raises (it has no data), after the op was counted.
    with GRAD_MODES[grad_mode](), HostRoundTrips() as trips, contextlib.suppress(RuntimeError, NotImplementedError):
        run()
    counts = {"syncs": trips.syncs, "host_data": trips.host_data, "cross_device_copies": trips.cross_device_copies}
    assert counts[kind].total() >= 1, str(trips)
    assert all(c.total() == 0 for k, c in counts.items() if k != kind), str(trips)
    assert all("test_host_round_trips.py" in origin for origin in trips.origins), trips.origins


@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
def test_counter_counts_nothing_for_work_that_stays_on_the_device(grad_mode):
    """Tensors filled on their device, Python scalars, a 0-dim CPU tensor (read as a scalar), int indexing
    and same-device moves are no round trips."""
    scalar = torch.tensor(2.0)
    with GRAD_MODES[grad_mode](), HostRoundTrips() as trips:
        steps = torch.arange(10, device="meta")
        t = steps[3].expand(4)
        torch.full((4,), 3, device="meta")
        torch.randn(4, generator=torch.Generator().manual_seed(0))
        ON_META * scalar + 2.5 + t
        ON_META.to(ON_META.device)
        ON_META.to(torch.float64)
        ON_CPU[CPU_INDEX]
        ON_CPU.repeat_interleave(2)
        torch.where(ON_CPU > 0, ON_CPU, 0.0)
    assert trips.total == 0, str(trips)


# ---- sampling steps on the CPU ---------------------------------------------------------------------------

PROCESSES = {
    "eps_fixed_small": lambda: GaussianDiffusion.from_schedule("linear", 1000),
    "v_learned_range": lambda: GaussianDiffusion.from_schedule("cosine", 1000, "v", "learned_range"),
    "x0_fixed_large": lambda: GaussianDiffusion.from_schedule("scaled_linear", 1000, "x0", "fixed_large"),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("process", list(PROCESSES))
def test_a_sampling_step_makes_no_host_round_trip(sampler, process):
    """Each step after the first: no sync (e.g. DDPM asking `t[0] == 0`) and no tensor built from host data."""
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for trips in count_steps(sampler, PROCESSES[process](), x_T, generator=generator):
        assert trips.syncs == Counter(), str(trips)
        assert trips.host_data == Counter(), str(trips)


@pytest.mark.parametrize("threshold", [StaticThreshold(1.0), DynamicThreshold(0.9)], ids=["static", "dynamic"])
def test_a_thresholded_step_makes_no_host_round_trip(threshold):
    """Clamping x0, statically or by a per-sample quantile, reads nothing back on the host."""
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    d = GaussianDiffusion.from_schedule("linear", 1000, "x0")
    for trips in count_steps("ddpm", d, x_T, generator=generator, threshold=threshold):
        assert trips.total == 0, str(trips)


# ---- on the meta device, where copies from the CPU show -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sampling_step_on_the_schedule_device_copies_nothing(dtype):
    """On the meta device (a stand-in for a GPU: a copy from the CPU shows there, where on the CPU it is a
    no-op), after `diffusion.to(device)`, no step copies a schedule array or a timestep from the host."""
    d = GaussianDiffusion.from_schedule("linear", 1000, "v", "learned_range").to("meta")
    x_T = torch.empty(2, 1, 4, 4, device="meta", dtype=dtype)
    for sampler in SAMPLERS:
        for trips in count_steps(sampler, d, x_T, generator=torch.Generator().manual_seed(1)):
            assert trips.total == 0, f"{sampler}: {trips}"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_an_inversion_step_makes_no_host_round_trip(device):
    d = GaussianDiffusion.from_schedule("linear", 1000, "v").to(device)
    x0 = torch.zeros(2, 1, 4, 4, device=device)
    with StepWindows() as windows:
        ddim_invert(stand_in_model, d, x0, num_steps=3, callback=windows, progress=False)
    assert len(windows.steps) == 2
    for trips in windows.steps:
        assert trips.total == 0, str(trips)


def test_the_schedule_is_copied_to_a_device_once_in_float64():
    """`to(device)` copies the arrays there once; later gathers reuse them; the host arrays stay for respacing."""
    d = GaussianDiffusion.from_schedule("linear", 10).to("meta")
    on_meta = d.coefficients(torch.device("meta"))
    assert all(a.device.type == "meta" and a.dtype == torch.float64 for a in vars(on_meta).values())
    with HostRoundTrips() as trips:
        assert d.coefficients(torch.device("meta")) is on_meta
        d.model_timesteps(torch.zeros(2, dtype=torch.long, device="meta"))
    assert trips.total == 0, str(trips)
    assert d.coef.betas.device.type == "cpu"
