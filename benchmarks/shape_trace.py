"""Where a shapes model loses an attribute after the text encoder: the links docs/prompt_adherence.md traces.

    PYTHONPATH=. python3 benchmarks/shape_trace.py --model runs/quickstart/pipeline --probe runs/ablation/probe

Three tables, each on real held-out renderings (seed 1 of the held-out split) and their stage-1 latents:
1. **Latent distance per attribute**: how far one scene's latent moves when one attribute changes (median of
   `--scenes`), beside the same distance in pixels: the attribute's share of the denoising loss.
2. **Decoding under latent noise**: the probe on decode(z + s n) for a few s: how much random latent error each
   attribute survives.
3. **The U-Net's x0 estimate at t**: x_t = q(z, t), x0-hat from the U-Net under the right caption, an empty one and
   one with a wrong shape word, decoded and read by the probe; the estimate's RMS error per latent value.
The probe folder is one `ldm evaluate` or `benchmarks/prompt_adherence.py` trained (it is trained there if absent).
`--vae FOLDER` instead of `--model` prints tables 1 and 2 alone, for a stage-1 VAE before any stage 2 is trained on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesDataset, render_scene
from ldm.evaluation.probe import ProbeConfig, load_or_train_probe
from ldm.generation import LatentDiffusionPipeline

CAPTION = "a {size} {color} {shape} at the {position} on a {background} background"
READ = ("shape", "color", "size", "position")
CHANGED = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}


def pixels(scene: dict, resolution: int) -> torch.Tensor:
    image = np.asarray(render_scene(scene, resolution), dtype=np.float32) / 255.0
    return torch.from_numpy(image).permute(2, 0, 1)[None]  # [0, 1]


class StageOne:
    """The two methods of the pipeline that tables 1 and 2 use, on a VAE folder alone."""

    def __init__(self, folder: Path) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
        self.default_size = self.vae.config.sample_size

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def latent_distances(pipe: LatentDiffusionPipeline | StageOne, scenes: int, rng: np.random.Generator) -> None:
    side = pipe.default_size
    latent, pixel = {k: [] for k in CHANGED}, {k: [] for k in CHANGED}
    for _ in range(scenes):
        color = str(rng.choice(COLORS))
        base = {
            "shape": str(rng.choice(SHAPES)), "color": color, "size": str(rng.choice(SIZES)),
            "background": str(rng.choice([c for c in COLORS if c != color])),
            "position": str(rng.choice(POSITIONS)), "jitter": (0, 0, 1.0),
        }  # fmt: skip
        x0 = pixels(base, side)
        z0 = pipe.encode_image(x0)
        for key, values in CHANGED.items():
            allowed = [v for v in values if v != base[key] and not (key == "color" and v == base["background"])]
            x1 = pixels(base | {key: str(rng.choice(allowed))}, side)
            latent[key].append(float((pipe.encode_image(x1) - z0).norm()))
            pixel[key].append(float((2 * (x1 - x0)).norm()))  # in the [-1, 1] range the VAE sees
    print(f"\n1. distance when one attribute changes (median of {scenes} scenes; latent RMS is about 1)")
    print("| attribute | latent | pixels |\n| --- | --- | --- |")
    for key in CHANGED:
        print(f"| {key} | {np.median(latent[key]):.2f} | {np.median(pixel[key]):.2f} |")


def read(pipe: LatentDiffusionPipeline | StageOne, probe: torch.nn.Module, latents: torch.Tensor, truth: dict) -> dict:
    names = probe.predict(pipe.decode(latents).clamp(-1, 1))
    return {k: 100 * float(np.mean([a == b for a, b in zip(names[k], truth[k], strict=True)])) for k in truth}


def x0_estimate(pipe: LatentDiffusionPipeline, x_t: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor):
    """The U-Net's estimate of the clean latent from x_t under `conditioning`."""
    d = pipe.diffusion
    prediction, _ = d.split_output(pipe.unet(x_t, d.model_timesteps(t), encoder_hidden_states=conditioning).sample)
    return d.predict_x0_eps(prediction, x_t, t)[0]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a model folder: all three tables")
    source.add_argument("--vae", type=Path, help="a stage-1 VAE folder: tables 1 and 2")
    parser.add_argument("--probe", type=Path, default=Path("runs/ablation/probe"))
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--scenes", type=int, default=80)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model) if args.model else StageOne(args.vae)
    probe, _ = load_or_train_probe(ProbeConfig(), args.probe)
    latent_distances(pipe, args.scenes, rng)

    data = ShapesDataset(args.images, pipe.default_size, "heldout", seed=1)
    items = [data[i] for i in range(args.images)]
    scenes = [item["attributes"] for item in items]
    truth = {k: [s[k] for s in scenes] for k in READ}
    z0 = pipe.encode_image(torch.stack([item["pixel_values"] for item in items]) * 0.5 + 0.5)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    print(f"\n2. the probe on decoded latents plus random noise of RMS s ({args.images} held-out renderings)")
    print("| s | " + " | ".join(READ) + " |\n|" + " --- |" * (len(READ) + 1))
    for s in (0.0, 0.1, 0.2, 0.3, 0.5):
        row = read(pipe, probe, z0 + s * noise, truth)
        print(f"| {s:g} | " + " | ".join(f"{row[k]:.1f}" for k in READ) + " |")
    if isinstance(pipe, StageOne):
        return

    wrong = [str(rng.choice([v for v in SHAPES if v != s["shape"]])) for s in scenes]
    right, _ = pipe.encode_prompt([CAPTION.format(**s) for s in scenes])
    swapped, _ = pipe.encode_prompt([CAPTION.format(**(s | {"shape": w})) for s, w in zip(scenes, wrong, strict=True)])
    empty, _ = pipe.encode_prompt([""] * args.images)
    d = pipe.diffusion
    print("\n3. the U-Net's x0 estimate from x_t, decoded: shape read (right caption, empty caption, wrong shape word")
    print("read as the true / as the named shape), colour read, and the estimate's RMS error per latent value")
    print("| t | noise / signal | right | empty | wrong: true | wrong: named | colour (right) | RMS error |")
    print("|" + " --- |" * 8)
    for level in (50, 100, 300, 500, 700, 900):
        t = torch.full((args.images,), level)
        x_t = d.q_sample(z0, t, noise)
        x_right, x_wrong = x0_estimate(pipe, x_t, t, right), x0_estimate(pipe, x_t, t, swapped)
        r, e = read(pipe, probe, x_right, truth), read(pipe, probe, x0_estimate(pipe, x_t, t, empty), truth)
        w_true = read(pipe, probe, x_wrong, {"shape": truth["shape"]})["shape"]
        w_named = read(pipe, probe, x_wrong, {"shape": wrong})["shape"]
        rms = float((x_right - z0).pow(2).mean().sqrt())
        print(
            f"| {level} | {float(d.snr(t[:1])) ** -0.5:.2f} | {r['shape']:.1f} | {e['shape']:.1f} | {w_true:.1f} | "
            f"{w_named:.1f} | {r['color']:.1f} | {rms:.3f} |"
        )


if __name__ == "__main__":
    main()
