"""`ldm distill`: latent consistency distillation on the training runtime, on a tiny teacher folder."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.data import DataConfig
from ldm.diffusion.consistency import guidance_scale_embedding
from ldm.diffusion.consistency_distillation import SkipStepGrid, ddim_step_to, guided_prediction
from ldm.generation import LatentDiffusionPipeline
from ldm.generation.noise_schedule import NoiseScheduleConfig
from ldm.training.diffusion_config import ValidationConfig
from ldm.training.distill_config import ConsistencyConfig, DistillExperimentConfig, DistillTrainConfig
from ldm.training.distill_stage import student_unet, train_distill
from tests.pipeline.tiny_models import IMAGE_SIZE, tiny_pipeline, tiny_unet

V_ZERO_SNR = NoiseScheduleConfig(prediction="v", zero_terminal_snr=True, timestep_spacing="trailing")


@pytest.fixture
def teacher_dir(tmp_path):
    return tiny_pipeline(V_ZERO_SNR).save_pretrained(tmp_path / "teacher")


def distill_config(teacher, **train) -> DistillExperimentConfig:
    settings = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "sample_every": 2, "checkpoint_every": 2}
    settings |= {"log_every": 1, "num_threads": 1, "log_with": "none"}
    return DistillExperimentConfig(
        teacher=str(teacher),
        data=DataConfig(resolution=IMAGE_SIZE, num_samples=16, heldout_samples=4),
        distill=ConsistencyConfig(time_cond_proj_dim=16),
        train=DistillTrainConfig(**(settings | train)),
        validation=ValidationConfig(
            prompts=["a red circle"], images_per_prompt=1, num_inference_steps=2, sampler="lcm"
        ),
    )


def test_the_skip_step_grid_is_diffusers_ddim_solver_grid():
    grid = SkipStepGrid.build(1000, 50)
    step = 1000 // 50
    expected = torch.arange(1, 51) * step - 1  # DDIMSolver: (np.arange(1, N + 1) * step_ratio).round() - 1
    torch.testing.assert_close(grid.timesteps, expected)
    torch.testing.assert_close(grid.previous, (expected - step).clamp(min=0))
    t, t_prev = grid.draw(64, torch.Generator().manual_seed(0))
    assert set(t.tolist()) <= set(expected.tolist()) and torch.equal(t_prev, (t - step).clamp(min=0))
    with pytest.raises(ValueError, match=r"distill.ddim_timesteps: 30 does not divide"):
        SkipStepGrid.build(1000, 30)


def test_the_guided_teacher_step_is_ddim_on_the_guided_pair():
    diffusion = V_ZERO_SNR.build()
    x_t, t, t_prev = torch.randn(3, 4, 2, 2), torch.tensor([999, 519, 19]), torch.tensor([979, 499, 0])
    cond, uncond, w = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([1.0, 4.0, 7.5])
    x0, eps = guided_prediction(diffusion, cond, uncond, x_t, t, w)
    # Guiding v itself and converting once gives the same pair: the conversions are linear in v.
    guided_v = uncond + w[:, None, None, None] * (cond - uncond)
    x0_ref, eps_ref = diffusion.predict_x0_eps(guided_v, x_t, t)
    torch.testing.assert_close(x0, x0_ref)
    torch.testing.assert_close(eps, eps_ref)
    abar = diffusion.coefficients(t.device).alphas_cumprod[t_prev].float()[:, None, None, None]
    torch.testing.assert_close(ddim_step_to(diffusion, x0, eps, t_prev), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_the_untrained_student_is_the_teacher_whatever_the_guidance():
    teacher = tiny_unet().eval()
    student = student_unet(teacher, 16).eval()
    assert student.config.time_cond_proj_dim == 16
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = teacher(x, t, context).sample
        for w in (1.0, 8.0):
            cond = guidance_scale_embedding(torch.full((2,), w), 16)
            torch.testing.assert_close(student(x, t, context, timestep_cond=cond).sample, expected)


def test_distill_writes_a_folder_that_draws_with_lcm_and_resumes_to_the_same_weights(teacher_dir, tmp_path):
    metrics = train_distill(distill_config(teacher_dir), tmp_path / "whole")
    folder = tmp_path / "whole" / "pipeline"
    assert metrics["step"] == 4 and metrics["target_updates"] == 4
    assert (tmp_path / "whole" / "samples" / "final.png").is_file()
    student = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet", use_safetensors=True)
    assert student.config.time_cond_proj_dim == 16
    moved = [k for k, v in student.state_dict().items() if k in teacher.state_dict()
             and not torch.equal(v, teacher.state_dict()[k])]  # fmt: skip
    assert moved, "the student never left the teacher's weights"
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert pipe.defaults.sampler == "lcm" and pipe.defaults.num_inference_steps == 2
    image = pipe("a red circle", num_inference_steps=1, output_type="np", seed=0, progress=False).images
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and bool((image >= 0).all() and (image <= 1).all())

    # Two steps, stopped, resumed for the other two: the same student (the target network is in the checkpoint).
    train_distill(distill_config(teacher_dir, steps=2), tmp_path / "halves")
    train_distill(distill_config(teacher_dir), tmp_path / "halves", resume="latest")
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "halves" / "pipeline", subfolder="unet")
    for key, value in student.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_a_teacher_the_distillation_cannot_take_is_refused_by_name(tmp_path):
    learned = tiny_pipeline(NoiseScheduleConfig(variance="learned_range")).save_pretrained(tmp_path / "learned")
    with pytest.raises(ValueError, match="learned_range"):
        train_distill(distill_config(learned), tmp_path / "out1")
    pipe = tiny_pipeline(V_ZERO_SNR)
    pipe.unet = student_unet(pipe.unet, 16)
    student = pipe.save_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="already takes a guidance embedding"):
        train_distill(distill_config(student), tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"guidance_min": 0.5}, "distill.guidance_min: 0.5 is below 1"),
        ({"guidance_min": 4.0, "guidance_max": 2.0}, "distill.guidance_max: 2.0 is below guidance_min"),
        ({"loss": "l1"}, "distill.loss: 'l1' is not one of"),
        ({"target_decay": 1.0}, "distill.target_decay"),
    ],
)
def test_bad_distillation_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyConfig(**settings)


def test_the_cpu_recipe_equals_the_defaults_and_the_gpu_recipe_loads():
    from pathlib import Path

    from ldm.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert load_config(DistillExperimentConfig, configs / "distill_shapes_cpu.yaml") == DistillExperimentConfig()
    sd = load_config(DistillExperimentConfig, configs / "distill_sd15.yaml")
    assert sd.data.resolution == 512 and sd.distill.guidance_min >= 1 and sd.validation.sampler == "lcm"


def test_the_command_distils_the_model_it_is_given(teacher_dir, tmp_path):
    from ldm.cli import main

    settings = ["data.resolution=16", "data.num_samples=8", "data.heldout_samples=4", "distill.time_cond_proj_dim=8",
                "train.steps=1", "train.batch_size=4", "train.log_with=none", "train.num_threads=1",
                "validation.images_per_prompt=1", "validation.prompts=[a red circle]"]  # fmt: skip
    args = ["distill", "--model", str(teacher_dir), "--output-dir", str(tmp_path / "run")]
    assert main([*args, *[a for s in settings for a in ("--set", s)]]) == 0
    student = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "pipeline", subfolder="unet")
    assert student.config.time_cond_proj_dim == 8


def test_the_guidance_embedding_trains_at_its_own_learning_rate(teacher_dir, tmp_path):
    cfg = distill_config(teacher_dir, lr=1e-5, lr_schedule="constant", warmup_steps=0, sample_every=100)
    cfg.distill.guidance_embedding_lr = 1e-2
    metrics = train_distill(cfg, tmp_path / "run")
    assert metrics["lr_by_group"] == {"student": 1e-5, "guidance_embedding": 1e-2}
    student = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "pipeline", subfolder="unet")
    # Adam moves a weight by about its lr per step: 4 steps at 1e-5 could not move the zero-initialised map this far.
    assert student.time_embedding.cond_proj.weight.abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"distill\.guidance_embedding_lr: must be positive"):
        ConsistencyConfig(guidance_embedding_lr=0.0)
