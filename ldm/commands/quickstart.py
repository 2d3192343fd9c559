"""`ldm quickstart`: the whole system on a laptop CPU in one command.

Stage 1 trains the autoencoder on the built-in shapes (configs/autoencoder_shapes_cpu.yaml's defaults),
stage 2 trains the text-conditioned U-Net on its latents (configs/diffusion_shapes_cpu.yaml's defaults),
then the saved pipeline is loaded back from disk and draws a grid for a set of prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay inside the functions, so `ldm --help` is instant
    from ldm.training import AutoencoderExperimentConfig, DiffusionExperimentConfig

DEFAULT_OUTPUT_DIR = "runs/quickstart"

# In the data's caption language (every shapes caption names size, colour, shape, position and background);
# "large" so that the shape is readable at 32 px (small shapes are 5 px across).
QUICKSTART_PROMPTS = (
    "a large red circle at the center on a white background",
    "a large blue square at the center on a yellow background",
    "a large green triangle at the center on a black background",
    "a large yellow circle at the center on a blue background",
    "a large white triangle at the center on a red background",
    "a large orange square at the center on a green background",
    "a large purple circle at the center on an orange background",
    "a large black square at the center on a white background",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `quickstart` to the `ldm` command line."""
    parser = subparsers.add_parser(
        "quickstart",
        help="train both stages on the built-in shapes and draw images from prompts (about 20 minutes on 2 CPUs)",
        description="Generate the shapes data, train the autoencoder (DIR/autoencoder/), train the diffusion "
        "model (DIR/diffusion/ is its run, DIR/pipeline/ the model folder), and write a grid of generated "
        "images (DIR/samples/).",
    )
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default: {DEFAULT_OUTPUT_DIR}")
    parser.add_argument("--seed", type=int, default=0, help="seed of both trainings and of the final samples")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ldm.training import AutoencoderExperimentConfig, DiffusionExperimentConfig

    run_quickstart(Path(args.output_dir), args.seed, AutoencoderExperimentConfig(), DiffusionExperimentConfig())
    return 0


def run_quickstart(
    out: Path,
    seed: int,
    ae_cfg: AutoencoderExperimentConfig,
    ldm_cfg: DiffusionExperimentConfig,
    prompts: tuple[str, ...] = QUICKSTART_PROMPTS,
) -> Path:
    """Both stages into `out` with these configs (the stage-2 config's autoencoder is replaced by stage 1's
    output), then a grid drawn from the saved folder; prints the summary, returns the grid's path."""
    import torch

    from ldm.generation import LatentDiffusionPipeline
    from ldm.images import save_image_grid
    from ldm.training import train_autoencoder, train_diffusion

    timings: dict[str, float] = {}
    start = time.perf_counter()

    print(f"[1/3] autoencoder -> {out / 'autoencoder'}", flush=True)
    ae_cfg.train.seed = seed
    ae_metrics = _completed(train_autoencoder(ae_cfg, out / "autoencoder"), "train-autoencoder")
    timings["autoencoder"] = time.perf_counter() - start

    print(f"[2/3] diffusion model -> {out / 'pipeline'}", flush=True)
    ldm_cfg.autoencoder = str(out / "autoencoder" / "vae")
    ldm_cfg.train.seed = seed
    ldm_metrics = train_diffusion(ldm_cfg, out / "diffusion", pipeline_dir=out / "pipeline")
    ldm_metrics = _completed(ldm_metrics, "train-diffusion")
    timings["diffusion"] = time.perf_counter() - start - timings["autoencoder"]

    print("[3/3] sampling from the saved pipeline", flush=True)
    pipeline = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(list(prompts), num_images_per_prompt=4, generator=generator).images
    grid_path = out / "samples" / "quickstart.png"
    grid = save_image_grid(images, grid_path, rows=len(prompts), scale=max(1, 64 // images[0].size[0]))
    (out / "samples" / "quickstart_prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    timings["total"] = time.perf_counter() - start

    print(
        "\nquickstart finished in {:.1f} min (autoencoder {:.1f}, diffusion {:.1f})".format(
            timings["total"] / 60, timings["autoencoder"] / 60, timings["diffusion"] / 60
        )
    )
    print(f"  autoencoder run : {out / 'autoencoder'} (held-out PSNR {ae_metrics['psnr']:.2f} dB)")
    print(f"  model folder    : {out / 'pipeline'} (load with LatentDiffusionPipeline.from_pretrained)")
    print(f"  samples         : {grid} (one row per prompt, prompts in quickstart_prompts.txt)")
    print(f"  diffusion run   : {out / 'diffusion'} (validation grids in samples/)")
    print(f"  training curves : tensorboard --logdir {out}  (final loss {ldm_metrics['loss_last_100_steps']:.4f})")
    print(f'  next            : ldm generate --model {out / "pipeline"} "a blue circle on a red background"')
    return grid


def _completed(metrics: dict, command: str) -> dict:
    """`metrics` of a finished stage; a stage stopped by a signal ends the quickstart, which does not resume."""
    if metrics.get("stopped_by"):
        from ldm.commands import CommandError

        raise CommandError(
            f"{metrics['stopped_by']}: stopped at step {metrics['step']} ({metrics['checkpoint']}); the quickstart "
            f"does not resume, continue that stage with `ldm {command} --output-dir ... --resume latest`"
        )
    return metrics
