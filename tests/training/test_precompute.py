"""`ldm precompute-latents` and training on its shards (data.source: latents)."""

import json

import pytest
import torch

from ldm.data import ShapesDataset
from ldm.data.latent_shards import LatentShardSource
from ldm.training import train_diffusion
from ldm.training.diffusion_stage import load_vae
from ldm.training.precompute import precompute_latents

pytestmark = pytest.mark.training


def _items(folder, **kwargs):
    return list(LatentShardSource(folder, rank=0, world_size=1, **kwargs))


def _stored(moments, items):
    return any(torch.allclose(moments, item["moments"], atol=1e-5) for item in items)


def test_shards_hold_the_moments_of_every_image_and_its_mirror(tiny_config, tmp_path):
    cfg = tiny_config()
    cfg.data.num_samples, cfg.data.random_flip = 10, True
    manifest = precompute_latents(cfg, tmp_path / "latents", samples_per_shard=4)
    assert manifest["samples"] == 10 and manifest["shards"] == [f"latents-{j:06d}.tar" for j in range(3)]
    vae, data = load_vae(cfg.autoencoder).eval(), ShapesDataset(10, resolution=16, seed=cfg.data.seed)
    images = torch.stack([data[i]["pixel_values"] for i in range(10)])
    with torch.no_grad():
        moments = vae.encode(images).latent_dist.parameters
        mirrored = vae.encode(images.flip(-1)).latent_dist.parameters
    items = _items(tmp_path / "latents", shuffle_buffer=0)
    by_caption = sorted(range(10), key=lambda i: data[i]["caption"])  # shards are read in a shuffled order
    assert sorted(item["caption"] for item in items) == [data[i]["caption"] for i in by_caption]
    assert all(_stored(moments[i], items) for i in range(10))
    views = _items(tmp_path / "latents", random_flip=True)
    mirrors = sum(_stored(mirrored[i], views) for i in range(10))
    assert 0 < mirrors < 10 and mirrors + sum(_stored(moments[i], views) for i in range(10)) == 10  # both views drawn
    assert "context" in _items(tmp_path / "latents", with_context=True)[0]  # the encoder is frozen


def test_an_interrupted_precompute_resumes_and_a_stale_one_is_redone(tiny_config, tmp_path):
    cfg = tiny_config()
    cfg.data.num_samples = 12
    out = tmp_path / "latents"
    precompute_latents(cfg, out, samples_per_shard=4)
    (out / "manifest.json").unlink()
    (out / "latents-000001.json").unlink()  # as if killed while writing shard 1
    first = (out / "latents-000000.tar").stat().st_mtime_ns
    precompute_latents(cfg, out, samples_per_shard=4)
    assert (out / "latents-000000.tar").stat().st_mtime_ns == first  # kept
    assert json.loads((out / "manifest.json").read_text())["samples"] == 12
    cfg.text_encoder.seed = 7  # another frozen encoder: every shard's embeddings are stale
    manifest = precompute_latents(cfg, out, samples_per_shard=4)
    assert (out / "latents-000000.tar").stat().st_mtime_ns != first and manifest["samples"] == 12


def test_stage_2_trains_on_precomputed_latents_and_refuses_other_models(tiny_config, tmp_path):
    cfg = tiny_config()
    precompute_latents(cfg, tmp_path / "latents", samples_per_shard=16)
    cfg.data.source, cfg.data.train_path = "latents", str(tmp_path / "latents")
    metrics = train_diffusion(cfg, tmp_path / "run")
    assert metrics["step"] == 6 and metrics["latent_cache"] is False and (tmp_path / "run" / "pipeline").is_dir()
    cfg.text_encoder.seed = 7
    with pytest.raises(ValueError, match="caption embeddings were made by another text encoder"):
        train_diffusion(cfg, tmp_path / "other")
    cfg.text_encoder.seed, cfg.data.resolution = 0, 32
    with pytest.raises(ValueError, match="latents are of 16px images"):
        train_diffusion(cfg, tmp_path / "other2")


def test_latents_are_refused_where_images_are_needed(tmp_path):
    from ldm.config import ConfigError, load_config
    from ldm.data import DataConfig, build_dataset
    from ldm.training import AutoencoderExperimentConfig

    with pytest.raises(ConfigError, match=r"data\.source: 'latents' are stage 2's input"):
        load_config(AutoencoderExperimentConfig, None, ["data.source=latents", f"data.train_path={tmp_path}"])
    with pytest.raises(ValueError, match="holds no images to evaluate"):
        build_dataset(DataConfig(source="latents", train_path=str(tmp_path)), "heldout")
    with pytest.raises(FileNotFoundError, match="write the latent shards with `ldm precompute-latents`"):
        build_dataset(DataConfig(source="latents", train_path=str(tmp_path)), "train")
