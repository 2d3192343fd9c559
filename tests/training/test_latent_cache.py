import pytest
import torch
from diffusers import AutoencoderKL

from autoencoder.posterior import DiagonalGaussian
from conditioning.fingerprint import weights_fingerprint
from ldm.data import ShapesDataset
from ldm.training.latent_cache import LatentCache


def _vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def _encoder(vae):
    return lambda x: vae.encode(x).latent_dist.parameters


def _moments(cache: LatentCache) -> torch.Tensor:
    return torch.stack([cache[i]["moments"] for i in range(len(cache))])


def test_cache_holds_the_posterior_moments_and_captions(tmp_path):
    vae, data = _vae(), ShapesDataset(10, resolution=16)
    cache = LatentCache.build(_encoder(vae), data, tmp_path / "latents", "fp", batch_size=4, part_size=3)
    images = torch.stack([data[i]["pixel_values"] for i in range(10)])
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.parameters
    assert _moments(cache).shape == (10, 8, 8, 8)
    torch.testing.assert_close(_moments(cache), expected, atol=1e-5, rtol=1e-5)
    assert cache.captions == [data[i]["caption"] for i in range(10)]
    loaded = LatentCache.load(tmp_path / "latents")
    assert torch.equal(_moments(loaded), _moments(cache)) and loaded.captions == cache.captions
    assert len(list((tmp_path / "latents").glob("part-*"))) == 4  # 10 images in parts of 3


def test_each_read_draws_a_fresh_latent_from_the_cached_posterior(tmp_path):
    vae, data = _vae(), ShapesDataset(4, resolution=16)
    cache = LatentCache.build(_encoder(vae), data, tmp_path / "c", "fp")
    posterior = DiagonalGaussian(_moments(cache))
    a, b = posterior.sample(), posterior.sample()
    assert not torch.equal(a, b)
    torch.testing.assert_close(posterior.mean, _moments(cache)[:, :4])


def test_a_cache_from_another_vae_is_rebuilt_not_reused(tmp_path):
    data, path = ShapesDataset(4, resolution=16), tmp_path / "c"
    first, second = _vae(0), _vae(1)
    fp1, fp2 = weights_fingerprint(first, {"data": 1}), weights_fingerprint(second, {"data": 1})
    assert fp1 != fp2 and fp1 == weights_fingerprint(_vae(0), {"data": 1})
    assert fp1 != weights_fingerprint(first, {"data": 2})
    LatentCache.load_or_build(path, _encoder(first), data, fp1)
    rebuilt = LatentCache.load_or_build(path, _encoder(second), data, fp2)
    assert rebuilt.fingerprint == fp2
    with torch.no_grad():
        expected = second.encode(torch.stack([data[i]["pixel_values"] for i in range(4)])).latent_dist.parameters
    torch.testing.assert_close(_moments(rebuilt), expected, atol=1e-5, rtol=1e-5)
    assert LatentCache.load_or_build(path, lambda x: 1 / 0, data, fp2).fingerprint == fp2  # reused, not re-encoded


def test_a_cache_of_another_format_is_rebuilt_by_load_or_build_and_refused_by_load(tmp_path):
    data, path = ShapesDataset(4, resolution=16), tmp_path / "c"
    with pytest.raises(FileNotFoundError, match=r"no finished latent cache here .*; build one with LatentCache\.build"):
        LatentCache.load(path)
    path.mkdir()
    (path / "manifest.json").write_text('{"format": "ldm-latent-cache/1", "fingerprint": "fp", "parts": [4]}')
    with pytest.raises(FileNotFoundError, match="no finished latent cache"):
        LatentCache.load(path)
    rebuilt = LatentCache.load_or_build(path, _encoder(_vae()), data, "fp")
    assert LatentCache.load(path).fingerprint == rebuilt.fingerprint == "fp"


def test_items_are_read_from_disk_per_item(tmp_path):
    vae, data = _vae(), ShapesDataset(6, resolution=16)
    cache = LatentCache.build(_encoder(vae), data, tmp_path / "c", "fp", part_size=4)
    assert not [v for v in vars(cache.store).values() if isinstance(v, torch.Tensor)]  # no tensor held whole
    first = cache[5]["moments"]
    first.zero_()
    assert cache[5]["moments"].abs().sum() > 0  # each read is a fresh tensor from the file
