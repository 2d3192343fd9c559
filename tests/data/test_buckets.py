"""Aspect-ratio buckets: the bucket set, images prepared at their bucket, one-bucket batches from folders and shards."""

import io
import json
import math
from collections import Counter

import pytest
import torch
import webdataset as wds
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torch.utils.data import DataLoader

from ldm.config import ConfigError, load_config
from ldm.data import DataConfig, ImageFolderDataset, WebDatasetSource, build_dataset
from ldm.data.buckets import BucketBatchSampler, bucket_sizes, nearest_bucket, use_buckets
from ldm.training.config import TrainConfig
from ldm.training.loaders import make_loader

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


@pytest.mark.parametrize(
    ("resolution", "multiple", "max_ratio"), [(1024, 64, 2.0), (512, 8, 4.0), (32, 2, 2.0), (16, 4, 2.0), (64, 8, 1.0)]
)
def test_buckets_are_multiples_of_about_the_training_area_within_the_ratio(resolution, multiple, max_ratio):
    sizes = bucket_sizes(resolution, multiple, max_ratio)
    area = resolution**2
    assert (resolution, resolution) in sizes
    assert len(set(sizes)) == len(sizes) and set(sizes) == {(h, w) for w, h in sizes}  # both orientations
    for w, h in sizes:
        assert w % multiple == 0 and h % multiple == 0
        assert area - max(w, h) * multiple < w * h <= area  # the largest that fits: never above the area
        assert max(w / h, h / w) <= max_ratio
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios)
    if max_ratio > 1:
        assert len(sizes) >= 3  # not only the square


def test_the_usual_sdxl_sizes_are_among_the_buckets():
    sizes = bucket_sizes(1024, 64, 2.0)
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1408, 704), (704, 1408)} <= set(sizes)


def test_an_image_goes_to_the_bucket_nearest_in_log_ratio():
    sizes = [(10, 20), (20, 20), (40, 20)]  # 1:2, 1:1, 2:1
    # 3:2 is as far from 1:1 as from 2:1 in plain ratio (0.5 each), but nearer 2:1 in log ratio.
    assert nearest_bucket(30, 20, sizes) == 2
    assert nearest_bucket(20, 30, sizes) == 0  # the same distance the other way round
    assert nearest_bucket(21, 20, sizes) == 1
    assert nearest_bucket(500, 20, sizes) == 2  # beyond the widest bucket: the widest


def _ended(size, vertical=False):
    """An image whose first eighth (left, or top) is red, last eighth blue, and the middle grey."""
    w, h = size
    image = Image.new("RGB", size, GREY)
    if vertical:
        image.paste(RED, (0, 0, w, h // 8))
        image.paste(BLUE, (0, h - h // 8, w, h))
    else:
        image.paste(RED, (0, 0, w // 8, h))
        image.paste(BLUE, (w - w // 8, 0, w, h))
    return image


def _folder(root, images):
    """An image folder of (name, PIL image) pairs, each captioned with its name."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, image in images:
        image.save(root / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "text": name}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _colour(pixels, x=None, y=None):
    """The mean RGB (0..255) of column x or row y of a (3, H, W) tensor in [-1, 1]."""
    strip = pixels[:, :, x] if x is not None else pixels[:, y, :]
    return ((strip.mean(-1) + 1) * 127.5).tolist()


def _close(colour, expected, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(colour, expected, strict=True))


@pytest.mark.parametrize("center_crop", [True, False], ids=["centre", "random"])
def test_a_wide_image_keeps_both_ends_at_its_two_to_one_bucket(tmp_path, center_crop):
    root = _folder(
        tmp_path / "images",
        [("wide", _ended((66, 32))), ("tall", _ended((32, 64), vertical=True)), ("square", _ended((40, 40)))],
    )  # 66x32 resizes to 45x22: a 1-pixel remainder to crop
    square = ImageFolderDataset(root, 32)  # centre crop
    assert square[0]["pixel_values"].shape == (3, 32, 32)
    assert not _close(_colour(square[0]["pixel_values"], x=0), RED)  # a square crop loses the ends
    sizes = bucket_sizes(32, 2, 2.0)
    assert (44, 22) in sizes  # an exact 2:1 bucket
    data = ImageFolderDataset(root, 32, center_crop=center_crop)
    data.set_buckets(sizes)
    assert [data.bucket_sizes[b] for b in data.bucket_of] == [(44, 22), (22, 44), (32, 32)]
    wide, tall = data[0]["pixel_values"], data[1]["pixel_values"]
    assert wide.shape == (3, 22, 44) and tall.shape == (3, 44, 22)
    assert _close(_colour(wide, x=0), RED) and _close(_colour(wide, x=43), BLUE)
    assert _close(_colour(tall, y=0), RED) and _close(_colour(tall, y=43), BLUE)


def test_a_random_flip_still_flips_a_bucketed_image(tmp_path):
    root = _folder(tmp_path / "images", [("wide", _ended((64, 32)))])
    data = ImageFolderDataset(root, 32, random_flip=True)
    data.set_buckets(bucket_sizes(32, 2, 2.0))
    torch.manual_seed(0)
    left = [tuple(round(c) for c in _colour(data[0]["pixel_values"], x=0)) for _ in range(20)]
    assert {(255, 0, 0), (0, 0, 255)} == set(left)  # both ways round, at the same 2:1 size


def test_the_bucket_follows_the_exif_orientation(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x32, shown rotated by 90 degrees: 32x64
    _ended((64, 32)).save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    data = ImageFolderDataset(root, 32)
    data.set_buckets(bucket_sizes(32, 2, 2.0))
    assert data.bucket_sizes[data.bucket_of[0]] == (22, 44)
    assert data[0]["pixel_values"].shape == (3, 44, 22)


def _sampler_batches(bucket_of, batch_size, seed=0, epoch=0, **kwargs):
    sampler = BucketBatchSampler(bucket_of, batch_size, seed=seed, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


BUCKET_OF = [0] * 13 + [1] * 7 + [2] * 9 + [3] * 2  # bucket sizes that do not divide by the batch
MIXED = [BUCKET_OF[(7 * i) % len(BUCKET_OF)] for i in range(len(BUCKET_OF))]  # interleaved


def test_every_batch_holds_one_bucket_and_an_epoch_draws_every_index_once():
    batches = _sampler_batches(MIXED, 4, drop_last=False)
    assert all(len({MIXED[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(MIXED)))
    full = _sampler_batches(MIXED, 4)  # the training loader: full batches only
    drawn = [i for batch in full for i in batch]
    assert all(len(batch) == 4 and len({MIXED[i] for i in batch}) == 1 for batch in full)
    assert len(drawn) == len(set(drawn)) == 4 * (3 + 1 + 2)  # each bucket loses fewer than a batch
    assert len(BucketBatchSampler(MIXED, 4)) == len(full)
    assert len(BucketBatchSampler(MIXED, 4, drop_last=False)) == len(batches)


def test_the_order_depends_only_on_seed_and_epoch_and_mixes_buckets():
    first = _sampler_batches(MIXED, 2, seed=3, epoch=1)
    assert first == _sampler_batches(MIXED, 2, seed=3, epoch=1)
    assert first != _sampler_batches(MIXED, 2, seed=4, epoch=1)
    assert first != _sampler_batches(MIXED, 2, seed=3, epoch=2)
    buckets = [MIXED[batch[0]] for batch in first]
    assert buckets != sorted(buckets)  # the batches of the buckets are shuffled together
    in_order = _sampler_batches(MIXED, 2, shuffle=False, drop_last=False)
    assert [i for batch in in_order for i in batch] == sorted(range(len(MIXED)), key=lambda i: (MIXED[i], i))


@pytest.mark.parametrize("processes", [2, 3])
def test_accelerate_gives_each_rank_different_one_bucket_batches_every_epoch(processes):
    """The loader as `prepare_loader` shards it on each rank (accelerate's BatchSamplerShard)."""
    epochs = {}
    for rank in range(processes):
        loader = DataLoader(list(range(len(MIXED))), batch_sampler=BucketBatchSampler(MIXED, 2, seed=1))
        prepared = prepare_data_loader(loader, num_processes=processes, process_index=rank, put_on_device=False)
        for epoch in (0, 1):
            prepared.set_epoch(epoch)  # as DataStream does: reaches the sampler through accelerate's wrapper
            epochs.setdefault(epoch, []).append([batch.tolist() for batch in prepared])
    for epoch, per_rank in epochs.items():
        drawn = [i for batches in per_rank for batch in batches for i in batch]
        assert len(drawn) == len(set(drawn)), epoch  # disjoint across ranks
        assert len({len(batches) for batches in per_rank}) == 1  # every rank takes as many steps
        assert all(len({MIXED[i] for i in batch}) == 1 for batches in per_rank for batch in batches)
        whole = _sampler_batches(MIXED, 2, seed=1, epoch=epoch)
        assert sorted(drawn) == sorted(i for batch in whole[: len(whole) // processes * processes] for i in batch)
    assert epochs[0] != epochs[1]


def _train_config(batch_size):
    return TrainConfig(batch_size=batch_size, num_threads=1)


def test_the_training_loader_of_a_bucketed_folder_gives_one_size_per_batch(tmp_path):
    images = [(f"w{i}", _ended((48, 24))) for i in range(5)] + [(f"s{i}", _ended((30, 30))) for i in range(4)]
    images += [(f"t{i}", _ended((24, 40), vertical=True)) for i in range(6)]
    cfg = DataConfig(source="imagefolder", resolution=32, train_path=str(_folder(tmp_path / "images", images)))
    cfg.buckets = True
    data = use_buckets(build_dataset(cfg, "train"), cfg, multiple=2)
    loader = make_loader(data, _train_config(2))
    loader.batch_sampler.set_epoch(0)
    shapes = [tuple(batch["pixel_values"].shape) for batch in loader]
    assert Counter(shapes) == {(2, 3, 22, 44): 2, (2, 3, 32, 32): 2, (2, 3, 40, 24): 3}
    heldout = build_dataset(DataConfig(**{**cfg.__dict__, "heldout_path": cfg.train_path}), "heldout")
    assert getattr(heldout, "bucket_sizes", None) is None and heldout[0]["pixel_values"].shape == (3, 32, 32)


def _png(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_webdataset_bucketing_yields_one_bucket_batches(tmp_path):
    sizes = [(48, 24), (30, 30), (24, 40)]
    paths = []
    for s in range(2):
        path = tmp_path / f"train-{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(9):
                image = _ended(sizes[(i + s) % 3])
                sink.write({"__key__": f"{s}{i:03d}", "png": _png(image), "txt": f"s{s}-{i}"})
        paths.append(str(path))
    source = WebDatasetSource(paths, 32, shuffle_buffer=4, rank=0, world_size=1)
    source.set_buckets(bucket_sizes(32, 2, 2.0))
    batches = list(make_loader(source, _train_config(4)))
    assert all(len({tuple(p.shape) for p in batch["pixel_values"]}) == 1 for batch in batches)
    assert sorted(c for batch in batches for c in batch["captions"]) == sorted(
        f"s{s}-{i}" for s in (0, 1) for i in range(9)
    )
    assert {tuple(batch["pixel_values"].shape[-2:]) for batch in batches} == {(22, 44), (32, 32), (40, 24)}
    assert sum(len(batch["captions"]) == 4 for batch in batches) == 3  # 6 per size: one full batch each


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("max_aspect_ratio=0.5", "max_aspect_ratio: must be >= 1"),
        ("buckets=yes please", "buckets"),
        ("buckets=true", "buckets: the shapes source draws square images only"),
    ],
)
def test_bucket_settings_errors_name_the_key(tmp_path, override, key):
    path = tmp_path / "data.yaml"
    path.write_text("resolution: 32\n")
    with pytest.raises(ConfigError, match=key) as info:
        load_config(DataConfig, path, [override])
    assert str(path) in str(info.value)


def test_buckets_without_a_full_batch_are_a_named_error(tmp_path):
    root = _folder(tmp_path / "images", [("wide", _ended((48, 24))), ("square", _ended((30, 30)))])
    data = ImageFolderDataset(root, 32)
    data.set_buckets(bucket_sizes(32, 2, 2.0))
    with pytest.raises(ValueError, match=r"data\.buckets: no bucket holds train\.batch_size=2 images"):
        make_loader(data, _train_config(2))


def test_without_buckets_nothing_changes(tmp_path):
    cfg = DataConfig(
        source="imagefolder", resolution=32, train_path=str(_folder(tmp_path / "i", [("a", _ended((48, 24)))]))
    )
    data = use_buckets(build_dataset(cfg, "train"), cfg, multiple=2)
    assert data.bucket_sizes is None and data[0]["pixel_values"].shape == (3, 32, 32)
    assert math.isclose(cfg.max_aspect_ratio, 2.0) and cfg.buckets is False


def test_stage_1_refuses_buckets_by_name(tmp_path):
    from ldm.config import ConfigError, load_config
    from ldm.training import AutoencoderExperimentConfig

    overrides = ["data.source=imagefolder", f"data.train_path={tmp_path}", "data.buckets=true"]
    with pytest.raises(ConfigError, match=r"data\.buckets: stage 2 only"):
        load_config(AutoencoderExperimentConfig, None, overrides)
