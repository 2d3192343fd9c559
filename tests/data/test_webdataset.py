"""WebDataset shards: every shard read by exactly one (rank, worker), samples decoded like image folders."""

import io
import itertools
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data import DataConfig, WebDatasetSource, build_dataset, collate_examples
from ldm.data.webdataset_source import shards_for_consumer

RES = 8
NUM_SHARDS = 12
PER_SHARD = 3


def _png(color, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """12 shards of 3 samples; every caption is unique ("s{shard}-{i}"), so it identifies the sample."""
    paths = []
    for s in range(NUM_SHARDS):
        path = tmp_path / f"train-{s:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(PER_SHARD):
                sink.write({"__key__": f"{s:03d}{i:03d}", "png": _png((20 * s, 10 * i, 0)), "txt": f"s{s}-{i}"})
        paths.append(str(path))
    return paths


def _captions(dataset, num_workers=0):
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=collate_examples)
    return [c for batch in loader for c in batch["captions"]]


ALL_CAPTIONS = {f"s{s}-{i}" for s in range(NUM_SHARDS) for i in range(PER_SHARD)}


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (1, 3), (2, 2), (3, 4), (4, 3)])
def test_shards_are_partitioned_across_ranks_and_workers(world_size, num_workers):
    shards = [f"shard-{i}.tar" for i in range(NUM_SHARDS)]
    orders = []
    for epoch in (0, 1):
        assigned = [
            shards_for_consumer(shards, rank, world_size, worker, num_workers, seed=5, epoch=epoch)
            for rank, worker in itertools.product(range(world_size), range(num_workers))
        ]
        flat = [s for part in assigned for s in part]
        assert len(flat) == len(set(flat)) == NUM_SHARDS  # disjoint, and together every shard
        assert max(map(len, assigned)) - min(map(len, assigned)) <= 1
        orders.append(assigned)
    assert orders[0] != orders[1]  # the epoch reshuffles which consumer reads what


def test_too_few_shards_for_the_readers_is_an_error():
    with pytest.raises(ValueError, match="3 shards cannot feed 2 processes x 2 data-loader workers"):
        shards_for_consumer(["a", "b", "c"], 0, 2, 0, 2)


def test_simulated_ranks_with_real_workers_read_every_sample_once(shards):
    seen = []
    for rank in range(2):
        ds = WebDatasetSource(shards, RES, rank=rank, world_size=2, seed=1)
        ds.set_epoch(3)
        seen.append(_captions(ds, num_workers=2))  # 2 ranks x 2 worker processes = 4 readers of 3 shards each
    assert len(seen[0]) == len(seen[1]) == NUM_SHARDS * PER_SHARD // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == ALL_CAPTIONS


def test_rank_comes_from_the_launcher_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    from_env = WebDatasetSource(shards, RES).consumer_shards()
    assert from_env == WebDatasetSource(shards, RES, rank=1, world_size=3).consumer_shards()
    assert len(from_env) == NUM_SHARDS // 3


def test_items_have_the_model_layout_and_shuffle_keeps_every_sample(shards):
    ds = WebDatasetSource(shards[:4], RES)
    item = next(iter(ds))
    assert item["pixel_values"].shape == (3, RES, RES) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    in_order = _captions(ds)
    shuffled = _captions(WebDatasetSource(shards[:4], RES, shuffle_buffer=5))
    assert sorted(in_order) == sorted(shuffled) and in_order != shuffled


def test_bad_samples_are_skipped_and_reported_or_fatal_when_strict(tmp_path, caplog):
    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good", "png": _png((255, 0, 0)), "txt": "red"})
        sink.write({"__key__": "nocaption", "png": _png((0, 255, 0))})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff not really a jpeg", "txt": "broken"})
        sink.write({"__key__": "noimage", "txt": "caption only"})
    with caplog.at_level(logging.INFO, logger="ldm.data.webdataset_source"):
        captions = _captions(WebDatasetSource(str(path), RES))
    assert captions == ["red", ""]
    assert "mixed.tar: broken: UnidentifiedImageError" in caplog.text
    assert "mixed.tar: noimage: ValueError: no image file" in caplog.text
    assert "read 2 samples from 1 shards, skipped 2, 1 with missing captions" in caplog.text
    with pytest.raises(ValueError, match=r"mixed\.tar: broken"):
        _captions(WebDatasetSource(str(path), RES, strict=True))


def test_build_dataset_expands_a_glob(shards, tmp_path):
    cfg = DataConfig(source="webdataset", resolution=RES, train_path=str(tmp_path / "train-*.tar"))
    ds = build_dataset(cfg, "train")
    assert ds.shards == sorted(shards)
    assert set(_captions(ds)) == ALL_CAPTIONS
    braces = WebDatasetSource(str(tmp_path / "train-{000..011}.tar"), RES)
    assert braces.shards == shards
    with pytest.raises(FileNotFoundError, match="no file matches"):
        WebDatasetSource(str(tmp_path / "nothing-*.tar"), RES)


def test_the_heldout_split_is_read_whole_by_every_rank(shards, tmp_path, monkeypatch):
    # Held-out data is evaluated by the main process alone, so it must not be split across ranks like training data.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    heldout = "::".join(shards[:3])
    cfg = DataConfig(source="webdataset", resolution=RES, train_path=heldout, heldout_path=heldout)
    assert len(set(_captions(build_dataset(cfg, "heldout")))) == 3 * PER_SHARD
    assert len(build_dataset(cfg, "train").consumer_shards()) == 1  # rank 1 of 2 trains on its share (of 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_trainers_data_stream_reshuffles_a_stream_every_epoch(shards, num_workers):
    from ldm.training import TrainConfig
    from ldm.training.loaders import make_loader
    from ldm.training.training_state import DataStream

    per_epoch = NUM_SHARDS * PER_SHARD // 2  # batches of 2
    stream_source = WebDatasetSource(shards, resolution=8, seed=0)
    loader = make_loader(stream_source, TrainConfig(batch_size=2, num_workers=num_workers))
    stream = DataStream(loader)
    epochs = [[c for _ in range(per_epoch) for c in next(stream)["captions"]] for _ in range(2)]
    assert stream.epoch == 1 and all(set(e) == ALL_CAPTIONS for e in epochs)  # each epoch reads every sample once
    assert epochs[0] != epochs[1]  # in a new shard order
