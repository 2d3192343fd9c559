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


@pytest.mark.parametrize("warmup", [True, False])
def test_an_update_flagged_on_the_device_is_the_host_update_or_none(warmup):
    host_model, device_model = _model(0.0), _model(0.0)
    host, device = EMA(host_model, decay=0.9, warmup=warmup), EMA(device_model, decay=0.9, warmup=warmup)
    for value, applied in [(1.0, True), (5.0, False), (2.0, True), (7.0, False), (-1.0, True)]:
        for model in (host_model, device_model):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(value)
        host.update(host_model, applied)
        device.update(device_model, torch.tensor(applied))
    assert device.num_updates == host.num_updates == 3
    for a, b in zip(host.shadow, device.shadow, strict=True):
        torch.testing.assert_close(a, b)
    assert device.current_decay() == host.current_decay()


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


def _uneven_model() -> nn.Sequential:
    """5 rows and 1 row to split over 2 processes: shards of 3 and 2 rows, and of 1 and 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 1))


def _train_and_average(model: nn.Module) -> EMA:
    """Three made-up optimizer steps (the same on every process), each folded into a fresh EMA of `model`."""
    ema = EMA(model, decay=0.9)
    for step in range(3):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.mul_(0.5).add_(float(step + i))
        ema.update(model)
    return ema


def _sharded_ema_worker(rank: int, init_file: str, saved: str) -> None:
    """One of 2 gloo processes: the EMA of a fully_shard-ed model, gathered, saved by rank 0 and loaded by both."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ldm.training.distributed import whole

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        reference = _train_and_average(_uneven_model())
        model = _uneven_model()
        fully_shard(model)
        ema = _train_and_average(model)
        assert all(isinstance(s, DTensor) for s in ema.shadow)  # each process averages its own shard only
        with pytest.raises(RuntimeError, match="sharded"):
            ema.save(saved)  # a shard alone must never be written as if it were the average
        gathered = ema.gathered()  # every process joins
        assert all(torch.equal(a, b) for a, b in zip(gathered.shadow, reference.shadow, strict=True))
        with ema.averaged(model):
            assert all(torch.equal(whole(p), s) for p, s in zip(model.parameters(), reference.shadow, strict=True))
        if rank == 0:
            gathered.save(saved)
        torch.distributed.barrier()
        restored = EMA(model, decay=0.5)
        restored.load(saved)
        for a, b in zip(restored.shadow, ema.shadow, strict=True):
            assert a.placements == b.placements and torch.equal(a.to_local(), b.to_local())
        assert restored.num_updates == 3
    finally:
        torch.distributed.destroy_process_group()


def test_a_sharded_ema_averages_shards_and_saves_and_loads_whole_tensors(tmp_path):
    saved = tmp_path / "ema.safetensors"
    args = (str(tmp_path / "init"), str(saved))
    torch.multiprocessing.spawn(_sharded_ema_worker, args=args, nprocs=2)
    reference = _train_and_average(_uneven_model())
    on_one_process = EMA(_uneven_model(), decay=0.5)
    on_one_process.load(saved)  # what 2 processes saved resumes on one
    assert all(torch.equal(a, b) for a, b in zip(on_one_process.shadow, reference.shadow, strict=True))
