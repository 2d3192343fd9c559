"""Both stages train under train.mixed_precision=bf16 on the CPU, through the real trainers.

Accelerate's autocast runs the networks' matmuls and convolutions in bfloat16 on the CPU as on a GPU, over
float32 master weights, with no loss scaler (bfloat16 has float32's exponent range). Each run is a few steps
of the tiny configs; it must finish with finite logged losses, changed weights and an exported model that
loads and draws finite images, and the networks' training forwards must really have run in bfloat16.

fp16 does not train here: on a CPU, accelerate accepts mixed_precision=fp16 but neither autocasts nor scales
(it sets up native AMP only on a GPU), so such a run would be a float32 run; the runtime refuses it (tested
below). The float16 pieces are tested directly (tests/autoencoder/test_adaptive_weight.py, test_posterior.py,
test_loss.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Decoder
from torch import Tensor, nn

import ldm.training.autoencoder_stage as stage_1
import ldm.training.diffusion_stage as stage_2
from autoencoder.config import LossConfig
from autoencoder.model import KLAutoencoder
from ldm import LatentDiffusionPipeline
from ldm.training import train_autoencoder, train_diffusion
from tests.host_round_trips import HostRoundTrips
from tests.training.test_train_autoencoder import tiny_config as tiny_autoencoder_config

pytestmark = [pytest.mark.training, pytest.mark.usefixtures("fresh_accelerate_state")]

SHORT_RUN = {"steps": 4, "log_every": 1, "sample_every": 100, "checkpoint_every": 4, "mixed_precision": "bf16"}


@pytest.fixture
def logged(monkeypatch) -> list[dict[str, Any]]:
    """Every dict the runtime logs to its tracker, in order."""
    records: list[dict[str, Any]] = []
    real_log = Accelerator.log

    def log(self: Accelerator, values: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        records.append(dict(values))
        real_log(self, values, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "log", log)
    return records


@contextmanager
def training_output_dtypes(module_type: type[nn.Module]) -> Iterator[Counter[torch.dtype]]:
    """The output dtypes of every training forward (train mode, gradients on) of a `module_type` module."""
    seen: Counter[torch.dtype] = Counter()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, module_type) and module.training and torch.is_grad_enabled():
            seen[(output if isinstance(output, Tensor) else output[0]).dtype] += 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def record_initial_weights(monkeypatch, module, builder: str) -> dict[str, Tensor]:
    """Wrap `module.builder` so that the state of the network it builds is copied before any training."""
    initial: dict[str, Tensor] = {}
    build = getattr(module, builder)

    def recording(*args: Any, **kwargs: Any) -> nn.Module:
        network = build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in network.state_dict().items()})
        return network

    monkeypatch.setattr(module, builder, recording)
    return initial


def changed(initial: dict[str, Tensor], trained: dict[str, Tensor]) -> list[str]:
    """The names of the weights that differ between the two states (which must have the same keys)."""
    assert set(initial) == set(trained)
    return [k for k in initial if not torch.equal(initial[k].float(), trained[k].float())]


def assert_finite_losses(logged: list[dict[str, Any]], keys: set[str], steps: int) -> None:
    """Every step logged every key in `keys`, each a finite number."""
    assert len(logged) == steps
    for record in logged:
        assert keys <= set(record), record
        assert all(math.isfinite(record[k]) for k in keys), record


def random_backbone_lpips(net: str) -> nn.Module:
    """LPIPS over a randomly initialized VGG: exercises the perceptual term in bf16 (it is not the metric)."""
    import lpips

    return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False).eval().requires_grad_(False)


def test_stage_1_with_lpips_and_the_discriminator_trains_in_bf16(tmp_path, logged, monkeypatch):
    gan = LossConfig(pixel_loss="l1", lpips_weight=1.0, disc_weight=0.5, disc_start=0, disc_channels=8, disc_layers=2)
    cfg = tiny_autoencoder_config(gan, batch_size=8, eval_samples=16, scale_samples=16, **SHORT_RUN)
    monkeypatch.setattr(stage_1, "build_lpips", random_backbone_lpips)
    initial = record_initial_weights(monkeypatch, stage_1, "build_vae")
    windows = count_round_trips_per_update(monkeypatch)

    with training_output_dtypes(Decoder) as decoder_dtypes:
        metrics = train_autoencoder(cfg, tmp_path)

    assert metrics["step"] == 4 and metrics["nonfinite_steps"] == 0
    generator, discriminator = (
        {"rec", "nll", "kl", "logvar", "g_loss", "d_weight"},
        {"d_loss", "logits_real", "logits_fake"},
    )
    assert_finite_losses(logged, {f"train/{k}" for k in generator | discriminator}, steps=4)
    assert decoder_dtypes == {torch.bfloat16: 4}  # one generator forward per step, in bf16
    assert len(windows) == 8 and all(w.total == 0 for w in windows), windows  # 2 updates a step, no round trip

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # the master weights stayed float32
    assert len(changed(initial, vae.state_dict())) > 0.9 * len(initial)
    model = KLAutoencoder(vae).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.isfinite(model.decode(model.encode(x).mode())).all()


def count_round_trips_per_update(monkeypatch) -> list[HostRoundTrips]:
    """Wrap stage 1's `updates` so that each update's computation (forward and losses, not the runtime's
    backward and optimizer step between them) runs in a `HostRoundTrips` window of its own."""
    windows: list[HostRoundTrips] = []
    real_updates = stage_1.AutoencoderStage.updates

    def counted(self: stage_1.AutoencoderStage, batch: Any, step: int) -> Iterator[Any]:
        updates = real_updates(self, batch, step)
        while True:
            with HostRoundTrips() as trips:
                update = next(updates, None)
            if update is None:
                return
            windows.append(trips)
            yield update

    monkeypatch.setattr(stage_1.AutoencoderStage, "updates", counted)
    return windows


def test_stage_2_trains_in_bf16_and_its_export_samples(tiny_config, tmp_path, logged, monkeypatch):
    cfg = tiny_config(ema_decay=0.5, **SHORT_RUN)
    initial = record_initial_weights(monkeypatch, stage_2, "build_unet")

    with training_output_dtypes(UNet2DConditionModel) as unet_dtypes:
        metrics = train_diffusion(cfg, tmp_path)

    assert metrics["step"] == 4 and metrics["nonfinite_steps"] == 0 and metrics["ema_updates"] == 4
    assert_finite_losses(logged, {"train/loss"}, steps=4)
    assert unet_dtypes == {torch.bfloat16: 4}

    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())  # the EMA of float32 master weights
    assert len(changed(initial, pipe.unet.state_dict())) > 0.9 * len(initial)
    images = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 3) and np.isfinite(images.images).all()


def test_fp16_on_the_cpu_is_refused_before_any_work(tiny_config, tmp_path):
    with pytest.raises(ValueError, match=r"train\.mixed_precision: fp16 on the CPU is float32 in disguise"):
        train_diffusion(tiny_config(mixed_precision="fp16"), tmp_path / "run")
    assert not (tmp_path / "run" / "cache").exists()
