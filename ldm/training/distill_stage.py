"""`ldm distill` on the training runtime: latent consistency distillation of a model folder into a few-step student.

`train_distill` reads as the run: the accelerator, the teacher folder (its VAE, text encoder and noise process are
the student's, frozen), the cached data, the distillation stage, the loop. The stage is what distillation adds to
the runtime: its step (the consistency loss against the target network on one guided DDIM step of the teacher), the
target network (an EMA of the student, kept in checkpoints as safetensors), the validation grid and the export of a
model folder that draws with sampler "lcm".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from ldm.data import build_dataset
from ldm.diffusion.consistency import consistency_denoise, guidance_scale_embedding
from ldm.diffusion.consistency_distillation import SkipStepGrid, consistency_loss, ddim_step_to, guided_prediction
from ldm.generation import LatentDiffusionPipeline
from ldm.generation.checks import check_sides
from ldm.training.batches import LatentBatches, build_train_dataset, cacheable, collate_for, require_captions
from ldm.training.diffusion_stage import write_validation_grid
from ldm.training.distill_config import DistillExperimentConfig
from ldm.training.distributed import is_sharded, prepare_loader
from ldm.training.ema import EMA
from ldm.training.loaders import make_loader
from ldm.training.runtime import TrainLoop, Update, start_run, train_schedule

TARGET_FILE = "target.safetensors"
logger = logging.getLogger(__name__)


def train_distill(
    cfg: DistillExperimentConfig,
    output_dir: str | Path,
    resume: str | None = None,
    pipeline_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Distil cfg.teacher into a student U-Net that takes the guidance scale as an input; returns the metrics.

    Writes OUTPUT_DIR/{config.yaml, cache/, checkpoints/, samples/, logs/, metrics.json} and the student's model
    folder (the teacher's with the student U-Net and sampler "lcm" as its default) at `pipeline_dir`, by default
    OUTPUT_DIR/pipeline.
    """
    out, tc = Path(output_dir), cfg.train
    teacher = load_teacher(cfg)  # before the run starts: a bad teacher fails before anything is written
    accelerator = start_run(cfg, tc, out, "distill")
    teacher = teacher.to(accelerator.device)
    dataset = build_dataset(cfg.data, "train")
    require_captions(dataset)
    cache_dir = (Path(tc.cache_dir) if tc.cache_dir else out / "cache") if cacheable(cfg, dataset) else None
    dataset, unconditional, _ = build_train_dataset(
        dataset, teacher.vae, teacher.text_encoder, cfg.data, cache_dir, accelerator
    )
    if unconditional is None:  # not cached: the context of "" is encoded once here
        unconditional = teacher.text_encoder.unconditional(1).to(accelerator.device, torch.float32)
    loader = make_loader(dataset, tc, collate_fn=collate_for(dataset))
    to_latents = LatentBatches(teacher.vae, teacher.text_encoder, 0.0, unconditional)  # no caption dropout
    stage = DistillStage(cfg, accelerator, teacher, to_latents, unconditional, Path(pipeline_dir or out / "pipeline"))
    return TrainLoop(accelerator, stage, prepare_loader(accelerator, loader), tc, out).run(resume)


def load_teacher(cfg: DistillExperimentConfig) -> LatentDiffusionPipeline:
    """The teacher folder, checked for what the distillation supports (ValueError naming the folder otherwise)."""
    teacher = LatentDiffusionPipeline.from_pretrained(cfg.teacher)
    check_teacher(teacher, cfg)
    teacher.text_encoder.set_frozen(True)
    teacher.vae.requires_grad_(False).eval()
    teacher.unet.requires_grad_(False).eval()
    return teacher


def check_teacher(teacher: LatentDiffusionPipeline, cfg: DistillExperimentConfig) -> None:
    """Refuse a teacher the consistency distillation (or diffusers' LCMScheduler, which must draw from the student's
    folder too) cannot take, and a data resolution its latent grid cannot hold."""
    where = f"teacher {cfg.teacher}"
    if teacher.unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            f"{where}: its U-Net already takes a guidance embedding (time_cond_proj_dim="
            f"{teacher.unet.config.time_cond_proj_dim}), so it is a distilled student; distil the model it came from"
        )
    schedule = teacher.noise_schedule
    if schedule.variance == "learned_range":
        raise ValueError(
            f"{where}: its noise variance is learned_range (the U-Net also outputs a variance), which LCMScheduler "
            "cannot read from a student; distil a fixed-variance model (noise.variance fixed_small or fixed_large)"
        )
    SkipStepGrid.build(schedule.num_train_timesteps, cfg.distill.ddim_timesteps)  # its checks, before the run starts
    check_sides(teacher.geometry, cfg.data.resolution, cfg.data.resolution, "data.resolution")


def student_unet(teacher: UNet2DConditionModel, time_cond_proj_dim: int) -> UNet2DConditionModel:
    """The teacher's U-Net with a guidance-embedding input (diffusers' `time_cond_proj_dim`: a bias-free linear map of
    the w embedding added to the timestep embedding's input), every other weight copied from the teacher.

    The new map starts at zero, so the untrained student is exactly the teacher's conditional prediction (diffusers'
    LCM script leaves it random, which starts the student off the teacher by an arbitrary shift)."""
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(
            f"student U-Net: the teacher's weights do not fit (missing {missing}, unexpected {unexpected})"
        )
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.device, teacher.dtype)


class DistillStage:
    """The student U-Net as a stage of the runtime, with its target network and the frozen teacher."""

    name = "distill"
    headline = ("loss",)

    def __init__(
        self,
        cfg: DistillExperimentConfig,
        accelerator: Accelerator,
        teacher: LatentDiffusionPipeline,
        to_latents: LatentBatches,
        unconditional: torch.Tensor,
        pipeline_dir: Path,
    ) -> None:
        tc, device = cfg.train, accelerator.device
        self.cfg, self.accelerator, self.teacher, self.to_latents = cfg, accelerator, teacher, to_latents
        self.unconditional, self.pipeline_dir = unconditional, pipeline_dir
        self.diffusion = teacher.diffusion
        self.grid = SkipStepGrid.build(self.diffusion.num_timesteps, cfg.distill.ddim_timesteps, device)
        self.student = student_unet(teacher.unet, cfg.distill.time_cond_proj_dim).train()
        # Two groups: the teacher's weights, and the new w-embedding map, which may learn faster.
        embedding = list(self.student.time_embedding.cond_proj.parameters())
        rest = [p for p in self.student.parameters() if all(p is not e for e in embedding)]
        embedding_lr = tc.lr if cfg.distill.guidance_embedding_lr is None else cfg.distill.guidance_embedding_lr
        self.schedules = [train_schedule(tc), train_schedule(tc, lr=embedding_lr)]
        groups = [
            {"params": rest, "lr": self.schedules[0](0), "name": "student"},
            {"params": embedding, "lr": self.schedules[1](0), "name": "guidance_embedding"},
        ]
        optimizer = torch.optim.AdamW(groups, betas=tc.adam_betas, weight_decay=tc.weight_decay, fused=True)
        self.model, self.optimizer = accelerator.prepare(self.student, optimizer)
        self.models = [self.model]
        if is_sharded(self.student):
            raise ValueError(
                "ldm distill: FSDP is not supported (the target network is a whole copy of the student); use DDP "
                "(accelerate launch without an FSDP config)"
            )
        # LCM's target network: an EMA of the student with no warm-up, starting equal to it.
        self.target = EMA(self.student, cfg.distill.target_decay, warmup=False).to(device)
        logger.info(
            "distils %s: student U-Net %.2fM parameters at lr %g, its w embedding at lr %g, w in [%g, %g], %d-step "
            "skip grid, %s loss, target decay %g",
            cfg.teacher, sum(p.numel() for p in self.student.parameters()) / 1e6, tc.lr, embedding_lr,
            cfg.distill.guidance_min, cfg.distill.guidance_max, cfg.distill.ddim_timesteps, cfg.distill.loss,
            cfg.distill.target_decay,
        )  # fmt: skip

    def updates(self, batch: Any, step: int) -> Iterator[Update]:
        """The consistency loss: the student's boundary-conditioned x0 at t_{n+k} against the target's at t_n, where
        x_{t_n} is one guided DDIM step of the teacher from x_{t_{n+k}} = q(z, t_{n+k})."""
        dc = self.cfg.distill
        latents, conditioning = self.to_latents(batch)
        context = conditioning["encoder_hidden_states"]
        batch_size, device = latents.shape[0], latents.device
        t, t_prev = self.grid.draw(batch_size)
        w = dc.guidance_min + (dc.guidance_max - dc.guidance_min) * torch.rand(batch_size, device=device)
        w_embedding = guidance_scale_embedding(w, dc.time_cond_proj_dim).to(device)
        x_t = self.diffusion.q_sample(latents, t, torch.randn_like(latents))
        with torch.no_grad():
            x_prev = self.teacher_step(x_t, t, t_prev, context, w)
            with self.target.averaged(self.student):  # the student's own weights come back after the block
                target_output = self.student(x_prev, self.diffusion.model_timesteps(t_prev), context,
                                             timestep_cond=w_embedding).sample  # fmt: skip
            target = consistency_denoise(self.diffusion, target_output, x_prev, t_prev, dc.timestep_scaling)
        output = self.model(x_t, self.diffusion.model_timesteps(t), context, timestep_cond=w_embedding).sample
        prediction = consistency_denoise(self.diffusion, output, x_t, t, dc.timestep_scaling)
        loss = consistency_loss(prediction, target, dc.loss, dc.huber_c)
        yield Update("student", loss, self.optimizer, self.model.parameters(), self.schedules, {"loss": loss.detach()})

    def teacher_step(
        self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, context: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """x_{t_prev}: one DDIM step of the teacher guided at w, its conditional and unconditional halves in one
        batch."""
        unconditional = self.unconditional.to(context.dtype).expand_as(context)
        output = self.teacher.unet(
            torch.cat([x_t, x_t]),
            self.diffusion.model_timesteps(torch.cat([t, t])),
            encoder_hidden_states=torch.cat([context, unconditional]),
        ).sample
        conditional, unconditional_output = output.float().chunk(2)
        pred_x0, pred_eps = guided_prediction(self.diffusion, conditional, unconditional_output, x_t, t, w)
        return ddim_step_to(self.diffusion, pred_x0, pred_eps, t_prev).to(x_t.dtype)

    def after_step(self, applied: Mapping[str, bool | torch.Tensor]) -> None:
        """Move the target network towards the student's new weights (not after a skipped update)."""
        if "student" in applied:
            self.target.update(self.student, applied["student"])

    def write_samples(self, path: Path) -> dict[str, float]:
        """The validation grid from the student, with the folder's sampler (lcm) and steps."""
        write_validation_grid(self.pipeline(), self.cfg, path)
        self.student.train().requires_grad_(True)  # the pipeline put it in inference mode
        return {}

    def save_state(self, folder: Path) -> None:
        """The target network, beside accelerate's state."""
        self.target.save(folder / TARGET_FILE)

    def load_state(self, folder: Path) -> None:
        """Restore the target network."""
        self.target.load(folder / TARGET_FILE)

    def export(self, output_dir: Path) -> dict[str, Any]:
        """The student's model folder and a last grid drawn from it."""
        pipeline = self.pipeline()
        pipeline.save_pretrained(self.pipeline_dir)
        write_validation_grid(pipeline, self.cfg, output_dir / "samples" / "final.png")
        return {
            "pipeline": str(self.pipeline_dir),
            "teacher": self.cfg.teacher,
            "target_updates": self.target.num_updates,
        }

    def pipeline(self) -> LatentDiffusionPipeline:
        """The student over the teacher's frozen networks and noise process, with the validation settings (sampler
        lcm) as its defaults."""
        t, dc = self.teacher, self.cfg.distill
        # The skip grid and boundary scale the student was trained on: the folder is then an LCMScheduler one, and a
        # request for more steps than the grid has is refused by name.
        schedule = replace(
            t.noise_schedule, original_inference_steps=dc.ddim_timesteps, timestep_scaling=dc.timestep_scaling
        )
        return LatentDiffusionPipeline(
            t.vae, t.text_encoder, self.student, schedule, self.cfg.validation.sampling_defaults()
        )
