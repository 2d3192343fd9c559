"""A training step that never waits for the host: no device-to-host sync and no host-to-device copy inside
one optimizer step of either stage, away from log, sample and checkpoint steps (counted with
`tests.host_round_trips.HostRoundTrips` on the CPU; what that cannot see is listed in its docstring).

The data loader's work (reading, collating, placing the batch) is outside the window: on a GPU that copy
of the batch is the one a step needs, made by the loader."""

import pytest

from ldm.training import runtime, training_state
from tests.host_round_trips import HostRoundTrips

pytestmark = pytest.mark.training

COUNTED_STEP = 3  # the 4th step: after warm-up, not a log / sample / checkpoint step


def count_one_step(monkeypatch) -> list[HostRoundTrips]:
    """Open a counting window around optimizer step COUNTED_STEP + 1, paused while the loader delivers."""
    windows: list[HostRoundTrips] = []
    run_step, draw = runtime.TrainLoop.run_step, training_state.DataStream.__next__

    def counted_run_step(self):
        if self.step != COUNTED_STEP:
            return run_step(self)
        windows.append(HostRoundTrips())
        with windows[-1]:
            return run_step(self)

    def loader_outside_the_window(self):
        window = windows[-1] if windows and self_in_window(windows[-1]) else None
        if window is None:
            return draw(self)
        window.__exit__(None, None, None)
        try:
            return draw(self)
        finally:
            window.__enter__()

    def self_in_window(window):
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return _get_current_dispatch_mode() is window

    monkeypatch.setattr(runtime.TrainLoop, "run_step", counted_run_step)
    monkeypatch.setattr(training_state.DataStream, "__next__", loader_outside_the_window)
    return windows


QUIET = {"steps": 5, "log_every": 100, "sample_every": 100, "checkpoint_every": 100}


def test_a_stage_2_step_on_cached_latents_has_no_host_round_trip(tiny_config, tmp_path, monkeypatch):
    from ldm.training import train_diffusion

    windows = count_one_step(monkeypatch)
    train_diffusion(tiny_config(ema_decay=0.9, grad_clip=1.0, **QUIET), tmp_path)
    (trips,) = windows
    assert trips.total == 0, str(trips)


def test_a_stage_2_step_with_a_trained_text_encoder_has_no_host_round_trip(tiny_config, tmp_path, monkeypatch):
    from ldm.training import train_diffusion

    cfg = tiny_config(ema_decay=0.9, **QUIET)
    cfg.text_encoder.frozen = False
    windows = count_one_step(monkeypatch)
    train_diffusion(cfg, tmp_path)
    (trips,) = windows
    # Tokenizing the captions is host work by nature: its token ids are the one copy this path needs.
    assert sum(trips.syncs.values()) == 0, str(trips)


def test_a_stage_1_step_with_the_discriminator_has_no_host_round_trip(tmp_path, monkeypatch):
    from autoencoder.config import LossConfig
    from ldm.training import train_autoencoder
    from tests.training.test_train_autoencoder import tiny_config

    loss = LossConfig(disc_start=1, disc_weight=0.5, disc_channels=8, disc_layers=2)
    windows = count_one_step(monkeypatch)
    train_autoencoder(tiny_config(loss, grad_clip=1.0, **QUIET), tmp_path)
    (trips,) = windows
    assert trips.total == 0, str(trips)
