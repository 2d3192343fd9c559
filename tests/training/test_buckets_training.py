"""Stage 2 on aspect-ratio buckets: the cached latents at bucket sizes, one-bucket batches, bitwise resume,
and precomputed latent shards at bucket sizes."""

import shutil
from collections import Counter

import pytest
import yaml

from ldm.data import DataConfig
from ldm.data.latent_shards import LatentShardSource
from ldm.training import train_diffusion
from ldm.training.batches import LatentBatches
from ldm.training.latent_cache import BucketedLatentCache
from ldm.training.precompute import precompute_latents
from tests.data.test_buckets import _ended, _folder
from tests.fault_run import different_tensors
from tests.training.launch import check_epoch_split, rank_records, run_ldm

pytestmark = pytest.mark.training

# 16 px training, f=2 VAE x 2-level U-Net: size multiple 4, buckets 12x20, 16x16, 20x12 (latents 6x10, 8x8, 10x6).
LATENT_SHAPES = {(8, 10, 6), (8, 8, 8), (8, 6, 10)}  # moments (2C, h, w)


@pytest.fixture
def mixed_folder(tmp_path):
    """24 captioned images: 8 square, 8 wide (5:3), 8 tall (3:5)."""
    images = []
    for i in range(8):
        images += [(f"square {i}", _ended((24, 24))), (f"wide {i}", _ended((40, 24)))]
        images.append((f"tall {i}", _ended((24, 40), vertical=True)))
    return _folder(tmp_path / "images", images)


def _bucketed(tiny_config, folder, **train):
    cfg = tiny_config(**train)
    cfg.data = DataConfig(source="imagefolder", resolution=16, train_path=str(folder), buckets=True)
    return cfg


def _record_latent_shapes(monkeypatch):
    shapes = []
    real = LatentBatches.__call__

    def call(self, batch):
        latents, conditioning = real(self, batch)
        shapes.append(tuple(latents.shape))
        return latents, conditioning

    monkeypatch.setattr(LatentBatches, "__call__", call)
    return shapes


def test_a_bucketed_run_caches_latents_at_bucket_sizes_and_resumes_bitwise(
    tiny_config, mixed_folder, tmp_path, monkeypatch
):
    # 8 images a bucket in batches of 4: 6 batches an epoch; the checkpoint at step 4 falls inside epoch 0 and
    # the resumed steps 5..8 cross into epoch 1.
    cfg = _bucketed(
        tiny_config, mixed_folder, steps=8, batch_size=4, checkpoint_every=4, sample_every=100, ema_decay=0.5
    )
    out = tmp_path / "run"
    shapes = _record_latent_shapes(monkeypatch)
    metrics = train_diffusion(cfg, out)
    assert metrics["step"] == 8 and metrics["latent_cache"] is True
    seen = Counter(shapes)  # latents (B, C, h, w): every batch is whole and of one bucket
    assert set(seen) == {(4, 4, 8, 8), (4, 4, 6, 10), (4, 4, 10, 6)} and sum(seen.values()) == 8
    assert all(2 <= n <= 4 for n in seen.values())  # epoch 0 draws each bucket's two batches

    cache = BucketedLatentCache.load(out / "cache" / "latents")
    assert sorted(cache.bucket_sizes) == [(12, 20), (16, 16), (20, 12)]
    assert {tuple(cache[i]["moments"].shape) for i in range(len(cache))} == LATENT_SHAPES
    by_caption = {cache[i]["caption"].split()[0]: tuple(cache[i]["moments"].shape) for i in range(len(cache))}
    assert by_caption == {"square": (8, 8, 8), "wide": (8, 6, 10), "tall": (8, 10, 6)}
    assert (out / "cache" / "captions" / "manifest.json").is_file()

    final = out / "checkpoints" / "step_0000008"
    straight = tmp_path / "straight"
    shutil.copytree(final, straight)
    shutil.rmtree(final)  # as if the run had died after step 4's checkpoint
    resumed = train_diffusion(cfg, out, resume="latest")
    assert (resumed["step"], resumed["steps_this_run"]) == (8, 4)
    for name in ("model.safetensors", "ema.safetensors"):
        assert different_tensors(straight / name, final / name) == [], name


def test_precomputed_latents_keep_their_bucket_sizes_and_train(tiny_config, mixed_folder, tmp_path, monkeypatch):
    cfg = _bucketed(tiny_config, mixed_folder)
    manifest = precompute_latents(cfg, tmp_path / "latents", samples_per_shard=10)
    assert sorted(map(tuple, manifest["data"]["buckets"])) == [(12, 20), (16, 16), (20, 12)]
    items = list(LatentShardSource(tmp_path / "latents", rank=0, world_size=1))
    assert len(items) == 24 and {tuple(item["moments"].shape) for item in items} == LATENT_SHAPES

    cfg = tiny_config(steps=3, batch_size=4, sample_every=100, checkpoint_every=100)
    cfg.data = DataConfig(source="latents", resolution=16, train_path=str(tmp_path / "latents"), shuffle_buffer=8)
    with pytest.raises(ValueError, match=r"precomputed at aspect-ratio bucket sizes, but data\.buckets is False"):
        train_diffusion(cfg, tmp_path / "refused")
    cfg.data.buckets = True
    shapes = _record_latent_shapes(monkeypatch)
    assert train_diffusion(cfg, tmp_path / "run")["step"] == 3
    assert all(shape[0] <= 4 for shape in shapes) and {s[2:] for s in shapes} <= {(8, 8), (6, 10), (10, 6)}


def test_a_square_precompute_refuses_a_bucketed_run(tiny_config, tmp_path):
    folder = _folder(tmp_path / "images", [(f"square {i}", _ended((24, 24))) for i in range(4)])
    cfg = tiny_config()
    cfg.data = DataConfig(source="imagefolder", resolution=16, train_path=str(folder))
    precompute_latents(cfg, tmp_path / "latents")
    cfg.data = DataConfig(source="latents", resolution=16, train_path=str(tmp_path / "latents"), buckets=True)
    with pytest.raises(ValueError, match=r"precomputed as square crops, but data\.buckets is True"):
        train_diffusion(cfg, tmp_path / "run")


def test_a_bucketed_folder_trains_without_the_cache_too(tiny_config, mixed_folder, tmp_path, monkeypatch):
    cfg = _bucketed(tiny_config, mixed_folder, steps=3, batch_size=4, sample_every=100, checkpoint_every=100)
    cfg.train.cache_latents = False
    cfg.data.center_crop, cfg.data.random_flip = False, True  # live encoding allows the augmentations
    shapes = _record_latent_shapes(monkeypatch)
    assert train_diffusion(cfg, tmp_path / "run")["latent_cache"] is False
    assert len(shapes) == 3 and {s[2:] for s in shapes} <= {(8, 8), (6, 10), (10, 6)}


def test_two_processes_take_different_one_bucket_batches(mixed_folder, tiny_vae_dir, tmp_path):
    """`accelerate launch` on 2 CPU processes: in each step each rank trains on a batch of one bucket, and in an
    epoch (3 steps: 6 batches of 4) the ranks' batches are disjoint and cover the folder."""
    config = {
        "autoencoder": str(tiny_vae_dir),
        "data": {"source": "imagefolder", "resolution": 16, "train_path": str(mixed_folder), "buckets": True},
        "text_encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "unet": {"block_out_channels": [32, 32], "cross_attention": [True, True], "attention_head_dim": 16},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "sample_every": 100},
        "validation": {"prompts": ["a red circle"], "images_per_prompt": 1, "num_inference_steps": 2},
    }
    config["text_encoder"] |= {"max_length": 16, "frozen": True}
    config["train"] |= {"checkpoint_every": 100, "num_threads": 1}
    (tmp_path / "dm.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "dm"
    args = ["train-diffusion", "--config", str(tmp_path / "dm.yaml"), "--output-dir", str(out)]
    records = rank_records(run_ldm(args, out, tmp_path, processes=2).stderr)
    assert set(records) == {(rank, step) for rank in (0, 1) for step in (1, 2, 3)}
    for (rank, step), record in records.items():
        kinds = {caption.split()[0] for caption in record["captions"]}
        assert len(record["captions"]) == 4 and len(kinds) == 1, (rank, step, record["captions"])
    expected = [f"{kind} {i}" for kind in ("square", "wide", "tall") for i in range(8)]
    check_epoch_split(records, range(1, 4), expected)
    assert sorted(BucketedLatentCache.load(out / "cache" / "latents").bucket_sizes) == [(12, 20), (16, 16), (20, 12)]
