"""LoRA fine-tuning of a pretrained U-Net (`unet.lora`), on a tiny Stable Diffusion folder written by diffusers.

Only the adapter trains and the base stays the folder's, bit for bit; checkpoints hold the adapter and resume
bitwise; the exported `pytorch_lora_weights.safetensors` loads in diffusers' StableDiffusionPipeline and in ours
to the same latents, and the merged model folder draws what base + adapter draws.
"""

import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from conditioning import TextEncoderConfig
from ldm.cli import main
from ldm.config import ConfigError, load_config
from ldm.data import DataConfig
from ldm.generation import LatentDiffusionPipeline
from ldm.generation.lora_weights import LORA_WEIGHT_NAME
from ldm.generation.noise_schedule import NoiseScheduleConfig
from ldm.training import (
    DiffusionExperimentConfig,
    DiffusionTrainConfig,
    ValidationConfig,
    diffusion_stage,
    train_diffusion,
)
from ldm.training.denoiser import Denoiser
from ldm.training.lora import check_lora, is_adapter_parameter, parameter_counts
from ldm.unet import LoRAConfig, UNetConfig, build_unet
from tests.fault_run import different_tensors
from tests.pipeline.test_sd_folders import PROMPTS, assert_same, sd_folder
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_unet

RANK, ALPHA = 4, 2.0  # alpha differs from the rank and from peft's default (8): losing it would show
STEPS, EVERY = 6, 3
SAMPLING = {"guidance_scale": 5.0, "num_inference_steps": 7, "output_type": "latent"}
# The noise process of sd_folder's scheduler config (SD 1.x's).
FOLDER_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction": "eps"}
FOLDER_SCHEDULE |= {"timestep_spacing": "leading", "steps_offset": 1, "zero_terminal_snr": False}
FOLDER_SCHEDULE |= {"set_alpha_to_one": False}
TRAIN = {"steps": STEPS, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "ema_decay": 0.5, "log_every": 1}
TRAIN |= {"sample_every": EVERY, "checkpoint_every": EVERY, "num_threads": 1}


def lora_config(base, **lora) -> DiffusionExperimentConfig:
    """A LoRA run on the SD folder `base`: its VAE, text encoder and U-Net, and its noise schedule."""
    return DiffusionExperimentConfig(
        autoencoder=str(base),
        data=DataConfig(resolution=IMAGE_SIZE, num_samples=48, heldout_samples=8),
        text_encoder=TextEncoderConfig(pretrained=str(base), frozen=True),
        unet=UNetConfig(pretrained=str(base), lora=LoRAConfig(**({"rank": RANK, "alpha": ALPHA} | lora))),
        noise=NoiseScheduleConfig(**FOLDER_SCHEDULE),
        train=DiffusionTrainConfig(**TRAIN),
        validation=ValidationConfig(prompts=["a red circle"], images_per_prompt=1, num_inference_steps=3),
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The pretrained folder: a tiny SD 1.x folder as diffusers writes it (tests/pipeline/test_sd_folders.py)."""
    return sd_folder(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """One LoRA run of STEPS steps: (output folder, metrics, the networks it trained in memory)."""
    built = []

    def build_networks(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = diffusion_stage.build_networks
    out = tmp_path_factory.mktemp("lora") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusion_stage, "build_networks", build_networks)
        metrics = train_diffusion(lora_config(base), out)
    torch.set_num_threads(threads)  # the run set one thread
    return SimpleNamespace(out=out, metrics=metrics, nets=built[0])


def our_latents(pipe: LatentDiffusionPipeline) -> torch.Tensor:
    """Our DDIM draw of PROMPTS, as latents."""
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, sampler="ddim", generator=generator, progress=False, **SAMPLING).images


def diffusers_latents(pipe: StableDiffusionPipeline, folder) -> torch.Tensor:
    """diffusers' DDIM draw of PROMPTS from the same folder's scheduler config (as in test_sd_folders.py)."""
    pipe.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE, generator=generator, **SAMPLING).images


@pytest.mark.training
def test_only_the_adapter_trains_and_the_base_stays_the_folders(run, base):
    folder = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
    folder = dict(folder.named_parameters())
    trained = dict(run.nets.unet.named_parameters())
    adapter = {name: p for name, p in trained.items() if is_adapter_parameter(name)}
    frozen = {name.replace(".base_layer", ""): p for name, p in trained.items() if name not in adapter}
    assert frozen.keys() == folder.keys()
    assert all(torch.equal(p, folder[name]) for name, p in frozen.items())  # bit for bit
    assert all(p.requires_grad for p in adapter.values()) and not any(p.requires_grad for p in frozen.values())
    ups = [p for name, p in adapter.items() if ".lora_B." in name]
    assert ups and all(p.abs().max() > 0 for p in ups)  # B starts at 0: every one of them trained
    counts = run.metrics
    assert counts["trainable_parameters"] == sum(p.numel() for p in adapter.values())
    assert counts["unet_parameters"] == sum(p.numel() for p in frozen.values())
    assert counts["trainable_parameters"] * 50 < counts["unet_parameters"]


@pytest.mark.training
def test_two_ddp_processes_train_the_adapter_alone(base, tmp_path):
    from ldm.config import save_config
    from tests.training.launch import run_ldm

    save_config(lora_config(base), tmp_path / "lora.yaml")
    out = tmp_path / "ddp"
    run_ldm(["train-diffusion", "--config", "lora.yaml", "--output-dir", str(out)], out, tmp_path, processes=2)
    last = out / "checkpoints" / f"step_{STEPS:07d}"
    assert not list(last.glob("model*.safetensors"))  # the adapter alone, as on one process
    assert len(list(last.glob("random_states_*"))) == 2  # two ranks ran
    ups = [v for k, v in load_file(last / LORA_WEIGHT_NAME).items() if ".lora.up." in k]
    assert ups and all(v.abs().max() > 0 for v in ups)


def test_a_pretrained_unet_loads_its_variant_weights(base, tmp_path):
    folder = tmp_path / "fp16"
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
    unet.to(torch.float16).save_pretrained(folder / "unet", variant="fp16", safe_serialization=True)
    sizes = {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 32, "sample_size": 8}
    with pytest.raises(OSError, match="fp16"):
        build_unet(UNetConfig(pretrained=str(folder)), **sizes)
    loaded = build_unet(UNetConfig(pretrained=str(folder), variant="fp16"), **sizes)
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight.half().float())
    with pytest.raises(ValueError, match="variant: 'fp16' names weight files of `pretrained`, which is not set"):
        UNetConfig(variant="fp16")


def test_full_fine_tuning_counts_every_unet_weight_as_trainable():
    unet = tiny_unet()
    counts = parameter_counts(Denoiser(unet))
    assert counts["trainable_parameters"] == counts["unet_parameters"] == sum(p.numel() for p in unet.parameters())


@pytest.mark.training
def test_a_checkpoint_holds_only_the_adapter_and_resumes_bitwise(run, base, tmp_path):
    saved = run.out / "checkpoints" / f"step_{EVERY:07d}"
    assert not list(saved.glob("model*.safetensors"))  # accelerate's whole-model file is not written
    with safe_open(str(saved / LORA_WEIGHT_NAME), framework="pt") as f:
        keys = set(f.keys())
    adapted = [name for name, _ in run.nets.unet.named_modules() if name.endswith(".lora_A")]
    assert len(keys) == 2 * len(adapted) > 0  # one A and one B per adapted layer, nothing else
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    assert len(load_file(saved / "ema.safetensors")) == len(keys)  # the average of the adapter alone

    resumed = tmp_path / "resumed"
    shutil.copytree(run.out, resumed, ignore=shutil.ignore_patterns("pipeline", "lora", "metrics.json"))
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:07d}")  # as if the run had died after step EVERY
    metrics = train_diffusion(lora_config(base), resumed, resume="latest")
    assert metrics["steps_this_run"] == STEPS - EVERY
    last = f"checkpoints/step_{STEPS:07d}"
    for name in (f"{last}/{LORA_WEIGHT_NAME}", f"{last}/ema.safetensors", f"lora/{LORA_WEIGHT_NAME}"):
        assert different_tensors(run.out / name, resumed / name) == [], name
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert different_tensors(run.out / unet, resumed / unet) == []


@pytest.mark.training
def test_the_exported_adapter_draws_the_same_latents_in_diffusers_and_ours(run, base):
    adapter = run.out / "lora" / LORA_WEIGHT_NAME
    assert run.metrics["lora"] == str(adapter)
    theirs = StableDiffusionPipeline.from_pretrained(base)
    plain_theirs = diffusers_latents(theirs, base)
    theirs.load_lora_weights(adapter.parent)
    ours = LatentDiffusionPipeline.from_pretrained(base)
    plain_ours = our_latents(ours)
    ours.load_lora_weights(adapter)
    adapted = our_latents(ours)
    assert_same(adapted, diffusers_latents(theirs, base))
    # The adapter changes the draw (in both), so the agreement above is not that of two no-ops.
    assert not torch.allclose(adapted, plain_ours, atol=1e-3) and not torch.allclose(plain_theirs, adapted, atol=1e-3)
    ours.unload_lora_weights()
    assert torch.equal(our_latents(ours), plain_ours)


@pytest.mark.training
def test_the_merged_model_folder_draws_what_base_plus_adapter_draws(run, base):
    weights = load_file(run.out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == load_file(base / "unet" / "diffusion_pytorch_model.safetensors").keys()  # plain U-Net
    merged = our_latents(LatentDiffusionPipeline.from_pretrained(run.out / "pipeline"))
    pipe = LatentDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(run.out / "lora")
    assert_same(merged, our_latents(pipe), 1e-4)  # merging rounds W + s B A once instead of every call


@pytest.mark.training
def test_ldm_generate_applies_the_adapter_at_its_scale(run, base, tmp_path, capsys):
    command = ["generate", "a red circle", "--model", str(base), "--steps", "2", "--seed", "1"]
    lora = str(run.out / "lora")
    runs = {"plain": [], "lora": ["--lora", lora], "off": ["--lora", lora, "--lora-scale", "0"]}
    outputs = {}
    for name, extra in runs.items():
        assert main([*command, *extra, "--out", str(tmp_path / name)]) == 0
        outputs[name] = (tmp_path / name / "000-a-red-circle.png").read_bytes()
    assert outputs["off"] == outputs["plain"] != outputs["lora"]
    capsys.readouterr()
    for extra, message in (
        (["--lora", str(tmp_path / "missing")], "missing does not exist"),
        (["--lora", str(base)], f"--lora: {base}: holds no {LORA_WEIGHT_NAME}"),
        (["--lora-scale", "0.5"], "--lora-scale: needs --lora"),
    ):
        with pytest.raises(SystemExit) as info:
            main([*command, *extra, "--out", str(tmp_path / "bad")])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("unet.lora.rank=0", "unet.lora.rank: must be >= 1, got 0"),
        ("unet.lora.alpha=0", "unet.lora.alpha: must be > 0"),
        ("unet.lora.rnak=8", "unknown key 'unet.lora.rnak'; valid keys here: alpha, rank, target_modules"),
        ("unet.lora.target_modules=[]", "unet.lora.target_modules: needs module names"),
    ],
)
def test_bad_lora_settings_name_their_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(DiffusionExperimentConfig, None, [f"autoencoder={tmp_path / 'vae'}", override])


def test_lora_yaml_and_overrides_build_the_nested_config(tmp_path):
    path = tmp_path / "c.yaml"
    frozen = "text_encoder: {frozen: true}\n"  # the CPU default trains its text encoder, which LoRA refuses
    path.write_text(f"autoencoder: {tmp_path / 'vae'}\n{frozen}unet:\n  lora: {{rank: 8}}\n")
    assert load_config(DiffusionExperimentConfig, path).unet.lora == LoRAConfig(rank=8)
    overrides = [f"autoencoder={tmp_path / 'vae'}", "text_encoder.frozen=true", "unet.lora.rank=2"]
    cfg = load_config(DiffusionExperimentConfig, None, overrides)
    assert cfg.unet.lora.rank == 2 and cfg.unet.lora.resolved_alpha == 2.0
    assert cfg.unet.lora.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert load_config(DiffusionExperimentConfig, path, ["unet.lora=null"]).unet.lora is None


def test_target_modules_the_unet_lacks_are_named():
    from ldm.training.lora import add_lora

    with pytest.raises(ValueError, match=r"unet\.lora\.target_modules: \['to_x'\] .*not found"):
        add_lora(tiny_unet(), LoRAConfig(target_modules=["to_x"]), seed=0)


def test_lora_with_a_trained_text_encoder_or_fsdp_is_refused(base, tmp_path):
    with pytest.raises(ConfigError, match=r"unet\.lora: .*text_encoder\.frozen is false"):  # when the file is read
        load_config(DiffusionExperimentConfig, None, ["unet.lora.rank=4", "text_encoder.frozen=false"])
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ValueError, match=r"unet\.lora: not supported under FSDP"):
        check_lora(LoRAConfig(), accelerator=fsdp)
    check_lora(None, accelerator=fsdp)  # full fine-tuning is not affected
