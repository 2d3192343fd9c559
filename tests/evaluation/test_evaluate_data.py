"""`ldm evaluate --data CONFIG`: a model measured on the held-out split of the user's own images."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldm.cli import main
from ldm.config import save_config
from ldm.data import DataConfig
from ldm.evaluation import DataEvaluationConfig, ProbeConfig, evaluate_on_data, load_data_config, open_heldout
from ldm.evaluation.bound import heldout_latent_bound
from ldm.evaluation.heldout import TRAIN_PATH_NOT_READ
from ldm.evaluation.pretrained import ClipScore, load_inception, pretrained_scores
from ldm.generation import LatentDiffusionPipeline, SamplingDefaults
from ldm.generation.noise_schedule import NoiseScheduleConfig
from tests.pipeline.conftest import model_folder, one_thread, pipe  # noqa: F401  (the fixtures, reused)
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_pipeline, tiny_text_encoder

HELDOUT_IMAGES = 10
TINY_PROBE = ProbeConfig(resolution=16, train_samples=256, heldout_samples=64, steps=20, batch_size=32)


def _picture(index: int) -> np.ndarray:
    """A 16 x 16 RGB picture that differs from the others: two colours split at a position that moves, plus noise."""
    rng = np.random.default_rng(index)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int64)
    split = 2 + index % 12
    pixels[:, :split], pixels[:, split:] = a, b
    return np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """train/ (4 images) and heldout/ (10 images) folders with metadata.jsonl, at the tiny model's 16 px."""
    root = tmp_path_factory.mktemp("own-data")
    for split, count, offset in (("train", 4, 100), ("heldout", HELDOUT_IMAGES, 0)):
        folder = root / split
        folder.mkdir()
        lines = []
        for i in range(count):
            Image.fromarray(_picture(offset + i)).save(folder / f"picture_{i}.png")
            lines.append(json.dumps({"file_name": f"picture_{i}.png", "text": f"{split} picture number {i}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _write_yaml(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_yaml(image_data):
    """A bare data section: the held-out folder only."""
    section = {"source": "imagefolder", "resolution": 16, "heldout_path": str(image_data / "heldout")}
    return _write_yaml(image_data / "data.yaml", section)


@pytest.fixture(scope="module")
def cli_run(model_folder, data_yaml, tmp_path_factory):  # noqa: F811
    """`ldm evaluate --model DIR --data data.yaml --num-samples 6 --bound-latents 1` run once for the tests below."""
    out = tmp_path_factory.mktemp("evaluation")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["evaluate", "--model", str(model_folder), "--data", str(data_yaml), "--output-dir", str(out)]
        code = main([*args, "--num-samples", "6", "--bound-latents", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def _short_pipeline() -> LatentDiffusionPipeline:
    """The tiny pipeline with a 20-step process and 4 sampling steps: the bound and the samples take no time."""
    return tiny_pipeline(NoiseScheduleConfig(num_train_timesteps=20), SamplingDefaults(2.0, num_inference_steps=4))


def test_the_cli_writes_metrics_report_and_grid(cli_run):
    out, metrics = cli_run
    for name in ("metrics.json", "report.md", "heldout_grid.png", "heldout_grid_captions.txt"):
        assert (out / name).is_file(), name
    assert metrics["data"]["config"]["source"] == "imagefolder" and metrics["data"]["num_images"] == 6
    report = (out / "report.md").read_text()
    assert "## Autoencoder (held-out images)" in report and f"{metrics['autoencoder']['psnr']:.2f} dB" in report
    assert "## Variational bound on held-out latents" in report
    assert "![held-out images and generations](heldout_grid.png)" in report


def test_num_samples_limits_the_images_measured(cli_run):
    _, metrics = cli_run  # 10 held-out images, --num-samples 6
    assert metrics["autoencoder"]["num_images"] == 6
    assert metrics["settings"]["num_samples"] == 6
    assert len(metrics["grid"]["captions"]) == 6  # fewer captions than the grid's 8 rows: one row each


def test_psnr_is_that_of_the_models_own_reconstructions(cli_run, model_folder):  # noqa: F811
    _, metrics = cli_run
    vae = LatentDiffusionPipeline.from_pretrained(model_folder).vae
    real = np.stack([_picture(i) for i in range(6)]).astype(np.float64) / 255  # the first 6 held-out images
    x = torch.from_numpy(real).permute(0, 3, 1, 2).float() * 2 - 1
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    fake = ((reconstruction.double() + 1) / 2).permute(0, 2, 3, 1).numpy()
    psnr = [10 * math.log10(1 / np.mean((f - r) ** 2)) for f, r in zip(fake, real, strict=True)]
    assert metrics["autoencoder"]["psnr"] == pytest.approx(np.mean(psnr), abs=1e-3)


def test_the_bound_is_finite_positive_bits_per_dimension(cli_run):
    _, metrics = cli_run
    bound = metrics["bound"]
    assert bound["num_latents"] == 1 and bound["timesteps"] == 1000
    assert math.isfinite(bound["bits_per_dim"]) and bound["bits_per_dim"] > 0


def test_the_grid_shows_the_real_heldout_images_in_its_first_column(cli_run):
    out, metrics = cli_run
    grid = np.asarray(Image.open(out / "heldout_grid.png").convert("RGB"))
    scale, pad, tile = 4, 2, 4 * IMAGE_SIZE  # 16 px images are enlarged 4 times; image_grid's 2 px padding
    rows, cols = 6, 1 + metrics["grid"]["per_caption"]
    assert grid.shape == (rows * tile + (rows + 1) * pad, cols * tile + (cols + 1) * pad, 3)
    for row in range(rows):
        top = pad + row * (tile + pad)
        first = grid[top : top + tile, pad : pad + tile]
        assert np.array_equal(first[::scale, ::scale], _picture(row)), row
        second = grid[top : top + tile, 2 * pad + tile : 2 * pad + 2 * tile]
        assert not np.array_equal(second[::scale, ::scale], _picture(row))  # a generated image is beside it
    captions = (out / "heldout_grid_captions.txt").read_text().splitlines()
    assert captions == [f"heldout picture number {i}" for i in range(6)]


def test_fid_kid_and_clip_are_unavailable_with_the_reason_when_no_weights_are_given(cli_run):
    out, metrics = cli_run
    generated = metrics["generated"]
    assert generated["fid"] is None and generated["kid_mean"] is None and generated["clip_score"] is None
    assert generated["num_images"] == 0  # nothing is drawn for metrics that cannot be computed
    assert "no Inception weights given" in generated["unavailable"]["FID"]
    assert "no Inception weights given" in generated["unavailable"]["KID"]
    assert "no CLIP model given" in generated["unavailable"]["CLIP score"]
    assert metrics["autoencoder"]["rfid"] is None and "Inception" in metrics["autoencoder"]["unavailable"]["rFID"]
    report = (out / "report.md").read_text()
    assert "FID unavailable: no Inception weights given" in report
    assert "KID unavailable" in report and "CLIP score unavailable" in report


def test_the_bound_is_heldout_latent_bound_on_the_first_heldout_images(image_data, data_yaml, tmp_path):
    pipeline = _short_pipeline()
    cfg = DataEvaluationConfig(num_samples=5, bound_latents=3, grid_captions=2, grid_images_per_caption=1)
    metrics = evaluate_on_data(pipeline, open_heldout(data_yaml), tmp_path, cfg, model="tiny")
    images = torch.stack([torch.from_numpy(_picture(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in range(3)])
    captions = [f"heldout picture number {i}" for i in range(3)]
    direct = heldout_latent_bound(pipeline, images, captions, batch_size=cfg.batch_size, seed=cfg.seed)
    assert metrics["bound"]["bits_per_dim"] == pytest.approx(direct["bits_per_dim"], rel=1e-6)
    assert metrics["bound"]["num_latents"] == 3 and metrics["bound"]["timesteps"] == 20
    assert math.isfinite(direct["bits_per_dim"]) and direct["bits_per_dim"] > 0


def test_a_runs_own_training_config_works_as_data(image_data, model_folder, tmp_path):  # noqa: F811
    from ldm.training.diffusion_config import DiffusionExperimentConfig

    data = DataConfig(
        source="imagefolder",
        resolution=16,
        train_path=str(image_data / "train"),
        heldout_path=str(image_data / "heldout"),
    )
    save_config(DiffusionExperimentConfig(autoencoder=str(model_folder / "vae"), data=data), tmp_path / "config.yaml")
    assert load_data_config(tmp_path / "config.yaml") == data
    heldout = open_heldout(tmp_path / "config.yaml")
    cfg = DataEvaluationConfig(num_samples=3, bound_latents=1, grid_captions=2, grid_images_per_caption=1)
    metrics = evaluate_on_data(_short_pipeline(), heldout, tmp_path / "out", cfg)
    assert metrics["data"]["config"]["train_path"] == str(image_data / "train")  # read, recorded, never opened
    assert metrics["autoencoder"]["num_images"] == 3


def test_a_bare_data_section_needs_no_train_path(data_yaml):
    cfg = load_data_config(data_yaml)
    assert cfg.source == "imagefolder" and cfg.train_path == TRAIN_PATH_NOT_READ


BAD_INPUTS = {
    "missing file": (None, "missing.yaml: config file not found"),
    "no data keys": ({"model": {"x": 1}}, "no `data:` section and none of the data keys"),
    "empty file": ({}, "it is empty"),
    "unknown data key": ({"source": "imagefolder", "heldout_pth": "x"}, "unknown key 'data.heldout_pth'"),
    "unknown key in a training config": ({"data": {"sorce": "shapes"}}, "unknown key 'data.sorce'"),
    "unknown section": ({"data": {"source": "shapes"}, "evaluation": {}}, "unknown key 'evaluation' beside `data:`"),
    "latents": ({"source": "latents", "train_path": "cache"}, "data.source: 'latents' holds precomputed latents"),
    "no heldout_path": ({"data": {"source": "imagefolder", "train_path": "x"}}, "data.heldout_path: required"),
    "missing heldout folder": ({"source": "imagefolder", "heldout_path": "nowhere"}, "data.heldout_path: image folder"),
    "resolution": (
        {"source": "shapes", "resolution": 18},
        "data.resolution: the model draws sides that are multiples of 4",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_configs_are_named_errors_before_any_work(case, model_folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    import ldm.evaluation

    content, expected = BAD_INPUTS[case]
    path = tmp_path / ("missing.yaml" if content is None else "data.yaml")
    if content is not None:
        _write_yaml(path, content)
    monkeypatch.chdir(tmp_path)  # "nowhere" is relative
    monkeypatch.setattr(ldm.evaluation, "evaluate_on_data", lambda *args, **kwargs: pytest.fail("evaluation ran"))
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(model_folder), "--data", str(path), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the model's loading bar, when it got that far
    assert err.startswith("ldm evaluate: error: --data: ") and str(path) in err
    assert expected in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--num-prompts", "4"], "--num-prompts: only without --data"),
        (["--num-samples", "0"], "--num-samples: must be >= 1"),
    ],
)
def test_options_of_the_other_mode_are_named(flags, expected, model_folder, data_yaml, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(model_folder), "--data", str(data_yaml), *flags])
    assert expected in capsys.readouterr().err


def test_num_samples_needs_data(model_folder, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(model_folder), "--num-samples", "4"])
    assert "--num-samples: only with --data" in capsys.readouterr().err


def test_shapes_data_adds_the_probes_reading_at_the_default_settings(tmp_path):
    path = _write_yaml(tmp_path / "shapes.yaml", {"data": {"source": "shapes", "resolution": 16, "heldout_samples": 5}})
    cfg = DataEvaluationConfig(num_samples=8, bound_latents=1, grid_captions=2, grid_images_per_caption=1)
    cfg.probe = TINY_PROBE
    metrics = evaluate_on_data(_short_pipeline(), open_heldout(path), tmp_path / "out", cfg)
    assert metrics["autoencoder"]["num_images"] == 5  # the split has 5 items, fewer than --num-samples
    probe = metrics["shapes_probe"]
    assert probe["num_prompts"] == 5
    assert probe["default_sampling"]["settings"] == {"guidance_scale": 2.0, "num_inference_steps": 4,
                                                     "sampler": "ddim", "seed": 0}  # fmt: skip
    accuracy = probe["default_sampling"]["accuracy"]
    assert all(0.0 <= accuracy[k] <= 1.0 for k in ("color", "shape", "background", "size", "position"))
    assert (tmp_path / "out" / "probe" / "probe.safetensors").is_file()
    assert "## Attribute probe (shapes data)" in (tmp_path / "out" / "report.md").read_text()


# ---- the pretrained metrics' code paths, on tiny random networks (numbers that mean nothing) ----------------


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A random 1-layer CLIPModel (safetensors) with a CLIP tokenizer and image processor: only a code-path
    test of the CLIP score, never a quality number."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_text_encoder().tokenizer
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(images, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fake_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights (variance-preserving init, so the features are not all
    ~0): only a code-path test of FID / KID, never a quality number."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    with pytest.MonkeyPatch.context() as patch:  # build it without the download its constructor would start
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None)
        torch.manual_seed(0)
        net = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for name, parameter in net.named_parameters():
        if name.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(parameter)
    path = tmp_path_factory.mktemp("fake-inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_clip_score_runs_on_a_local_clip_folder(tiny_clip_folder, image_data, data_yaml, tmp_path):
    cfg = DataEvaluationConfig(num_samples=4, bound_latents=1, grid_captions=1, grid_images_per_caption=1)
    cfg.clip_model = str(tiny_clip_folder)
    metrics = evaluate_on_data(_short_pipeline(), open_heldout(data_yaml), tmp_path, cfg)
    generated = metrics["generated"]
    assert generated["num_images"] == 4 and "CLIP score" not in generated["unavailable"]
    assert math.isfinite(generated["clip_score"]) and generated["clip_score"] >= 0
    assert generated["fid"] is None and "FID" in generated["unavailable"]  # still no Inception


def test_clip_score_is_100_times_the_mean_cosine_floored_at_zero(tiny_clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "b", "a blue square on a white background"]
    score = ClipScore(str(tiny_clip_folder), "cpu")
    score.update(images[:2], captions[:2])
    score.update(images[2:], captions[2:])
    model = CLIPModel.from_pretrained(tiny_clip_folder, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_folder)
    pixels = [(image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for image in images]
    with torch.no_grad():
        text = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True))
        vision = model.get_image_features(**processor(images=pixels, return_tensors="pt"))
    text, vision = (getattr(t, "pooler_output", t) for t in (text, vision))  # transformers 5: an output object
    cosine = torch.nn.functional.cosine_similarity(text, vision, dim=-1)
    assert score.compute() == pytest.approx(max(100 * cosine.mean().item(), 0.0), abs=1e-4)


def test_the_shapes_report_computes_the_clip_score_from_a_local_folder(tiny_clip_folder):
    from types import SimpleNamespace

    from ldm.evaluation import FidelityPrompts

    prompts = FidelityPrompts(["a red circle on a white background", "a blue square"], [{}, {}])
    cfg = SimpleNamespace(clip_model=str(tiny_clip_folder), inception_weights=None, seed=0)
    scores = pretrained_scores(_short_pipeline(), prompts, heldout=None, cfg=cfg, guidance_scale=2.0)
    assert math.isfinite(scores["clip_score"]) and set(scores["unavailable"]) == {"FID"}


def test_fid_kid_and_rfid_run_with_local_inception_weights(fake_inception_weights, data_yaml, tmp_path):
    cfg = DataEvaluationConfig(num_samples=4, bound_latents=1, grid_captions=1, grid_images_per_caption=1)
    cfg.inception_weights = str(fake_inception_weights)
    metrics = evaluate_on_data(_short_pipeline(), open_heldout(data_yaml), tmp_path, cfg)
    generated = metrics["generated"]
    assert set(generated["unavailable"]) == {"CLIP score"} and generated["num_images"] == 4
    assert math.isfinite(generated["fid"]) and generated["fid"] > 0
    assert math.isfinite(generated["kid_mean"]) and generated["kid_subset_size"] == 4
    assert math.isfinite(metrics["autoencoder"]["rfid"]) and "rFID" not in metrics["autoencoder"]["unavailable"]
    # Seeded: KID's random subsets are drawn the same way every run.
    again = evaluate_on_data(_short_pipeline(), open_heldout(data_yaml), tmp_path / "again", cfg)
    assert again["generated"]["kid_mean"] == generated["kid_mean"] and again["generated"]["fid"] == generated["fid"]


class _Payload:
    """An arbitrary object: a weights file that unpickles one could run anything."""


def test_inception_weights_are_read_weights_only(tmp_path):
    # torch-fidelity itself reads the file with weights_only=False; ours refuses pickled objects first.
    torch.save({"conv.weight": torch.zeros(2), "payload": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"--inception-weights: .* is not a weights-only state dict"):
        load_inception(str(tmp_path / "evil.pth"), "cpu")
