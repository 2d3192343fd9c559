"""The helpers that let both trainers run unchanged on one process or many (one process here; the
multi-process behaviour is pinned by tests/training/test_accelerate_launch.py)."""

import json
import logging
import re

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ldm.training.distributed import log_rank_step, prepare_loader, reduce_mean


class Stream(IterableDataset):
    def __iter__(self):
        yield from torch.arange(6.0)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator()  # no settings: the process-wide state stays as the trainer tests expect


def test_map_style_loaders_are_prepared_and_streams_are_left_to_split_themselves(accelerator):
    stream = DataLoader(Stream(), batch_size=2)
    assert prepare_loader(accelerator, stream) is stream
    counting = [torch.zeros(2, 3)]  # any other iterable (e.g. a test's wrapper) passes through as well
    assert prepare_loader(accelerator, counting) is counting
    table = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=2)
    prepared = prepare_loader(accelerator, table)
    assert prepared is not table and type(prepared).__module__.startswith("accelerate")
    assert torch.cat([b[0] for b in prepared]).tolist() == [0, 1, 2, 3, 4, 5]


def test_reduce_mean_on_one_process_keeps_the_values(accelerator):
    assert reduce_mean(accelerator, {"rec": 0.25, "kl": 3.0}) == {"rec": 0.25, "kl": 3.0}


def test_the_rank_line_is_logged_only_at_debug_level(accelerator, caplog):
    batch = {"captions": ["a red circle", "ein grüner Kreis"]}
    with caplog.at_level(logging.INFO, logger="ldm.training.distributed"):
        log_rank_step(accelerator, 3, {"loss": torch.tensor(0.5)}, batch)
    assert not caplog.records
    with caplog.at_level(logging.DEBUG, logger="ldm.training.distributed"):
        log_rank_step(accelerator, 3, {"loss": torch.tensor(0.5), "kl": 2.0}, batch)
    rank, step, record = re.fullmatch(r"rank (\d+) step (\d+) (\{.*\})", caplog.records[0].getMessage()).groups()
    assert (rank, step) == ("0", "3")
    assert json.loads(record) == {"values": {"loss": 0.5, "kl": 2.0}, "captions": batch["captions"]}
