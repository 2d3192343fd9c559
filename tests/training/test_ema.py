import pytest
import torch
from torch import nn

from ldm.training.ema import EMA


def _model(value: float) -> nn.Linear:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_ema_update_matches_closed_form():
    model = _model(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    values = [1.0, 2.0, -1.0]
    expected = 0.0
    for v in values:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(v)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * v
    assert all(torch.allclose(s, torch.full_like(s, expected)) for s in ema.shadow)


def test_ema_warmup_decay_ramps_up_to_the_configured_value():
    ema = EMA(_model(0.0), decay=0.999, warmup=True)
    decays = []
    for _ in range(10000):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays[0] == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly copies the weights
    assert decays == sorted(decays)
    assert decays[-1] == 0.999


def test_averaged_swaps_weights_in_and_restores_them():
    model = _model(3.0)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)
    with ema.averaged(model):
        assert all(torch.all(p == 3.0) for p in model.parameters())
    assert all(torch.all(p == 5.0) for p in model.parameters())


def test_save_and_load_round_trip(tmp_path):
    model = _model(1.0)
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        ema.update(_model(2.0))
    ema.save(tmp_path / "ema.safetensors")
    restored = EMA(_model(0.0), decay=0.5)
    restored.load(tmp_path / "ema.safetensors")
    assert restored.num_updates == 3 and restored.decay == 0.99
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, restored.shadow, strict=True))
    with pytest.raises(ValueError, match="EMA tensors"):
        EMA(nn.Linear(3, 3, bias=False), 0.9).load(tmp_path / "ema.safetensors")


def test_frozen_parameters_are_not_averaged_and_stay_untouched():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.5, warmup=False)
    assert len(ema.shadow) == 2  # the second layer's weight and bias
    frozen = model[0].weight.detach().clone()
    model.requires_grad_(False)  # as a sampling pipeline does; the tracked set must not change
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    ema.copy_to(model)
    assert torch.equal(model[0].weight, frozen)
    assert len(ema.tracked(model)) == 2
