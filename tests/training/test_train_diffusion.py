import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conditioning import TextEmbeddingCache
from ldm import LatentDiffusionPipeline
from ldm.data import ShapesDataset, collate_examples
from ldm.training import train_diffusion
from ldm.training.batches import CachedExamples, LatentBatches, collate_cached
from ldm.training.diffusion_stage import load_vae
from ldm.training.latent_cache import LatentCache
from ldm.training.runtime import learning_rate_factor

pytestmark = pytest.mark.training


def test_a_tiny_run_trains_saves_and_samples(tiny_config, tmp_path):
    out = tmp_path / "run"
    metrics = train_diffusion(tiny_config(), out)
    assert metrics["step"] == 6 and metrics["latent_cache"] is True
    assert (out / "cache" / "latents" / "manifest.json").is_file()
    assert (out / "cache" / "captions" / "manifest.json").is_file()
    assert (out / "samples" / "step_0000003.png").is_file() and (out / "samples" / "final.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["step"] == 6
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    first = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np")
    again = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np")
    assert first.images.shape == (1, 16, 16, 3)
    assert (first.images == again.images).all()
    assert pipe.defaults.guidance_scale == tiny_config().validation.guidance_scale


def test_the_exported_unet_holds_the_ema_weights(tiny_config, tmp_path):
    out = tmp_path / "run"
    train_diffusion(tiny_config(ema_decay=0.5), out)
    exported = list(LatentDiffusionPipeline.from_pretrained(out / "pipeline").unet.parameters())
    ema = load_file(out / "checkpoints" / "step_0000006" / "ema.safetensors")
    assert len(exported) == len(ema)
    assert all(torch.equal(p, ema[f"shadow.{i}"]) for i, p in enumerate(exported))


def test_a_trainable_text_encoder_is_trained_averaged_and_exported(tiny_config, tmp_path):
    from conditioning import TextEncoder

    cfg = tiny_config(ema_decay=0.5)
    cfg.text_encoder.frozen, cfg.text_encoder.token_rows = False, "captions"
    out = tmp_path / "run"
    train_diffusion(cfg, out)
    assert not (out / "cache" / "captions").exists()  # its embeddings change every step
    initial = TextEncoder.from_config(cfg.text_encoder).model.state_dict()
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    trained = pipe.text_encoder.model.state_dict()
    key = next(k for k in trained if k.endswith("token_embedding.weight"))
    # Only the rows of the training captions' tokens trained (text_encoder.token_rows: captions); the rest are as
    # initialized, and the trained rows are the average's.
    changed = (trained[key] != initial[key]).any(dim=1).nonzero().flatten()
    assert 0 < len(changed) < 100
    exported = [*pipe.unet.parameters(), *pipe.text_encoder.model.parameters()]  # the Denoiser's order
    table = next(i for i, p in enumerate(exported) if p.shape == trained[key].shape)
    ema = load_file(out / "checkpoints" / "step_0000006" / "ema.safetensors")
    assert len(exported) == len(ema)
    assert torch.equal(exported[table][changed], ema[f"shadow.{table}"])
    assert all(torch.equal(p, ema[f"shadow.{i}"]) for i, p in enumerate(exported) if i != table)
    assert pipe.text_encoder.frozen


def test_resume_continues_the_step_count_and_the_lr_schedule(tiny_config, tmp_path):
    cfg = tiny_config()
    straight = train_diffusion(cfg, tmp_path / "straight")
    out = tmp_path / "resumed"
    train_diffusion(cfg, out)
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # as if the run had died after step 3's checkpoint
    resumed = train_diffusion(cfg, out, resume="latest")
    assert resumed["step"] == straight["step"] == 6
    assert resumed["steps_this_run"] == 3
    assert resumed["lr"] == straight["lr"] == pytest.approx(cfg.train.lr * learning_rate_factor(5, cfg.train))
    assert resumed["ema_updates"] == 6  # the average continued from the checkpoint, not from scratch


def test_cached_and_live_batches_give_the_same_latents(tiny_config, tiny_vae_dir, tmp_path):
    from conditioning import TextEncoder

    cfg = tiny_config()
    vae, encoder = load_vae(str(tiny_vae_dir)).eval(), TextEncoder.from_config(cfg.text_encoder)
    data = ShapesDataset(4, resolution=16)
    cache = LatentCache.build(lambda x: vae.encode(x).latent_dist.parameters, data, tmp_path / "latents", "fp")
    captions = TextEmbeddingCache.build(encoder, cache.captions, tmp_path / "captions")
    examples = CachedExamples(cache, captions)
    unconditional = encoder.unconditional(1)
    torch.manual_seed(3)
    live, live_context = LatentBatches(vae, encoder, p_uncond=0.0)(collate_examples([data[i] for i in range(4)]))
    torch.manual_seed(3)
    to_latents = LatentBatches(vae, encoder, p_uncond=0.0, unconditional=unconditional)
    cached, cached_context = to_latents(collate_cached([examples[i] for i in range(4)]))
    torch.testing.assert_close(live, cached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(live_context["encoder_hidden_states"], cached_context["encoder_hidden_states"])
    assert live.std() > 0.1  # scaled by 0.7, non-trivial
    # Caption dropout on cached embeddings: every row becomes the context of "".
    dropped = LatentBatches(vae, encoder, p_uncond=1.0, unconditional=unconditional)
    _, context = dropped(collate_cached([examples[i] for i in range(4)]))
    torch.testing.assert_close(context["encoder_hidden_states"], unconditional.expand(4, -1, -1))


def test_a_missing_autoencoder_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config()
    cfg.autoencoder = str(tmp_path / "nowhere" / "vae")
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        train_diffusion(cfg, tmp_path / "run")


def test_a_resolution_the_unet_cannot_halve_is_refused(tiny_config, tmp_path):
    cfg = tiny_config()
    cfg.data.resolution = 18  # 9x9 latents: the 2-level U-Net cannot halve 9
    with pytest.raises(ValueError, match=r"data\.resolution"):
        train_diffusion(cfg, tmp_path / "run")


def test_an_image_folder_without_captions_stops_a_text_to_image_run(tiny_config, tmp_path):
    from PIL import Image

    from ldm.data import DataConfig

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(folder / f"{i}.png")
    cfg = tiny_config()
    cfg.data = DataConfig(source="imagefolder", resolution=16, train_path=str(folder))
    with pytest.raises(ValueError, match=r"images has no metadata\.jsonl, so every caption would be empty"):
        train_diffusion(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "cache").exists()


def test_every_rank_builds_the_same_unet_and_keeps_its_own_random_stream(tiny_config):
    from accelerate.utils import set_seed

    from ldm.training.diffusion_stage import build_networks

    cfg, weights, draws = tiny_config(), [], []
    for rank in (0, 1):
        set_seed(cfg.train.seed + rank)  # as start_run seeds each process
        weights.append(build_networks(cfg, torch.device("cpu")).unet.state_dict())
        draws.append(torch.rand(3))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # FSDP shards fit together
    assert not torch.equal(draws[0], draws[1])  # ranks still draw their own noise
