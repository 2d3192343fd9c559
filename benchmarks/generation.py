"""Issue 17's numbers on one model: fast samplers, DDIM inversion, img2img, inpainting, and their pictures.

Every figure is read by the attribute probe (`ldm/evaluation/probe.py`) from held-out captions or renderings
(`ldm/data/shapes.py`, split "heldout", seed 1 as `FidelityPrompts` draws them), one image each. Sections
(`--section`, repeatable; default all):

- solvers: probe accuracy, U-Net evaluations and seconds per image of each sampler and step count at the
  model's default guidance, every sampler starting from the same x_T per caption, and its agreement with
  DDIM 50 from that x_T (colour, shape and background read alike; PSNR against the DDIM-50 image).
- convergence: DDIM and DPM-Solver++ against DDIM 500 from the same x_T (latent RMS), w = 1 and the model's w.
- timing: seconds per image of DDIM 50 / 25 and DPM-Solver++ 20 / 15 / 10, interleaved rounds, min / median / max.
- inversion: DDIM inversion (50, 100, 200 steps) at w = 1 of held-out renderings, then DDIM from the x_T it
  finds; PSNR against the autoencoder's reconstruction (the best any latent can do) and against the rendering.
- img2img: each rendering with its caption's background colour changed, strengths 0.3 to 1.0 (`--strengths`,
  `--edit-guidance`): how often shape and position stay and the background changes. Picture:
  DOCS/img2img_strength.png.
- inpainting: a square mask over the shape, the caption's shape colour changed: how often the probe reads
  the new colour, and the error outside the mask next to the autoencoder's own. Picture: DOCS/inpainting.png.
- pictures: DOCS/solver_steps.png (samplers x steps) and DOCS/interpolation.png (slerp of x_T, linear text).

    PYTHONPATH=. python3 benchmarks/generation.py --model runs/quickstart/pipeline \\
        --probe runs/quickstart/evaluation/probe --out runs/generation_benchmark --docs docs

Each section prints a markdown table. OUT/results.json is rewritten after every row, so an interrupted run
keeps what it finished and a rerun with the same settings skips those rows (delete OUT to start over); OUT/tiles
keeps the few images the pictures need. Seconds per image: the wall time of a pipeline call (text encoding,
sampling, VAE decode) divided by its images, the median over the batches of a row, after one warm-up call.
U-Net evaluations are counted (a hook on the U-Net), not assumed.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.generation_bench import SEED, Bench, Results, Run, eta_of, table
from benchmarks.generation_support import (
    SPLIT_SEED,
    channels_first,
    edit_caption,
    heldout_scenes,
    masked_errors,
    next_color,
    percent,
    psnr,
    read,
    shape_masks,
    share,
    tiles,
)
from ldm.data.shapes import BACKGROUNDS, COLORS
from ldm.diffusion import slerp
from ldm.diffusion.sampler_table import SAMPLER_NAMES
from ldm.evaluation.fidelity import JUDGED, FidelityPrompts
from ldm.evaluation.probe import AttributeProbe, ProbeConfig, load_or_train_probe
from ldm.generation import LatentDiffusionPipeline
from ldm.generation.inputs import image_batch
from ldm.images import to_pil

log = logging.getLogger("generation")

SECTIONS = ("solvers", "timing", "convergence", "inversion", "img2img", "inpainting", "pictures")
TIMING_ROWS = [
    ("ddim", 50),
    ("ddim", 25),
    ("ddim", 10),
    ("dpmpp_2m", 20),
    ("dpmpp_2m", 15),
    ("dpmpp_2m", 10),
    ("dpmpp_2m", 8),
]
SOLVER_ROWS = ["ddim:10", "ddim:25", "ddim:50", "dpmpp_2m:8", "dpmpp_2m:10", "dpmpp_2m:15", "dpmpp_2m:20"]
SOLVER_ROWS += ["dpmpp_2m_sde:15", "dpmpp_2m_sde:20", "euler_ancestral:20", "euler_ancestral:30"]
REFERENCE = ("ddim", 50)  # what the solvers are compared with
DDIM_50 = {"sampler": "ddim", "num_inference_steps": 50, "eta": 0.0}  # the sampler of inversion and every edit
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PICTURE_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral")
PICTURE_STEPS = (5, 8, 10, 15, 20, 50)
PICTURE_SCENES = 4  # rows of the img2img and inpainting pictures


# ---- sections ------------------------------------------------------------------------------------------


def solver_row(probe: AttributeProbe, prompts: FidelityPrompts, run: Run, reference: np.ndarray) -> dict[str, Any]:
    """Probe accuracy per attribute (percent), cost, and agreement with the DDIM-50 images of the same x_T."""
    readings, reference_readings = read(probe, run.images), read(probe, reference)
    row = {k: share(readings[k], [a[k] for a in prompts.attributes]) for k in JUDGED}
    triples = [list(zip(r["color"], r["shape"], r["background"], strict=True)) for r in (readings, reference_readings)]
    same = np.array_equal(run.images, reference)
    return row | {
        "unet_evals_per_image": run.unet_evals_per_image,
        "seconds_per_image": run.seconds_per_image,
        "agree_ddim50": share(*triples),
        "psnr_ddim50": None if same else psnr(channels_first(run.images), channels_first(reference)).mean().item(),
    }


def solvers(bench: Bench, count: int, rows: list[tuple[str, int]]) -> None:
    w = bench.pipe.defaults.guidance_scale
    prompts = FidelityPrompts.heldout(count, bench.resolution, seed=SPLIT_SEED)
    x_T = {"latents": bench.noise(count)}  # the same start for every sampler: the comparison is paired
    done = bench.results.rows("solvers", bench.settings(captions=count, guidance_scale=w, seed=SEED))
    labels = {f"{s} {n}": (s, n) for s, n in [REFERENCE, *rows]}
    reference_label = f"{REFERENCE[0]} {REFERENCE[1]}"
    reference = bench.keep("solvers_reference") if reference_label in done else None
    for label, (sampler, steps) in labels.items():
        if label in done and (reference is not None or label != reference_label):
            continue
        kwargs = {"sampler": sampler, "num_inference_steps": steps, "eta": eta_of(sampler)}
        run = bench.generate(prompts.captions, x_T, warm_up=True, **kwargs)
        if label == reference_label:  # first: the row every other one is compared with
            reference = bench.keep("solvers_reference", run.images)
        bench.results.add("solvers", label, solver_row(bench.probe, prompts, run, reference))
    print(f"\n### Samplers: {count} held-out captions, w = {w:g}, one image each, the same x_T for every sampler\n")
    columns = [(k, k, ".1f") for k in JUDGED] + [
        ("unet_evals_per_image", "U-Net evals / image", ".0f"),
        ("seconds_per_image", "s / image", ".4f"),
        ("agree_ddim50", "colour, shape, bg read as from DDIM 50", ".1f"),
        ("psnr_ddim50", "PSNR vs DDIM 50 (dB)", ".2f"),
    ]
    print(table("sampler, steps", [(label, done[label]) for label in labels], columns))
    errors = ", ".join(f"{100 * math.sqrt(p * (1 - p) / count):.1f} at {100 * p:.0f}%" for p in (0.5, 0.8, 0.95))
    print(f"\nBinomial standard error of an accuracy at {count} captions, in points: {errors}; a difference under")
    print("about two of them is noise. The last two columns compare images from the same x_T (paired).")


def timing(bench: Bench, batch: int, repeats: int) -> None:
    """Seconds per image of each row, `repeats` rounds with the rows interleaved (a slow moment of the shared
    cores hits every row alike), and each row's time over DDIM 50's in the same round."""
    prompts = FidelityPrompts.heldout(batch, bench.resolution, seed=SPLIT_SEED).captions
    x_T = bench.noise(batch)

    def seconds(sampler: str, steps: int) -> float:
        began = time.perf_counter()
        bench.pipe(prompts, sampler=sampler, num_inference_steps=steps, eta=eta_of(sampler), latents=x_T,
                   output_type="np", progress=False)  # fmt: skip
        return (time.perf_counter() - began) / batch

    seconds("ddim", 2)  # warm-up
    rounds = [{f"{s} {n}": seconds(s, n) for s, n in TIMING_ROWS} for _ in range(repeats)]
    print(f"\n### Seconds per image: batch of {batch}, {repeats} interleaved rounds, the model's default w\n")
    print("| sampler, steps | s / image, min / median / max | vs DDIM 50 in the same round, min / median / max |")
    print("| --- | --- | --- |")
    for label in rounds[0]:
        times = sorted(r[label] for r in rounds)
        ratios = sorted(r[label] / r["ddim 50"] for r in rounds)
        spread = " / ".join(f"{t:.4f}" for t in (times[0], statistics.median(times), times[-1]))
        ratio = " / ".join(f"{q:.2f}" for q in (ratios[0], statistics.median(ratios), ratios[-1]))
        print(f"| {label} | {spread} | {ratio} |")


def convergence(bench: Bench, count: int, steps_list: tuple[int, ...] = (8, 10, 15, 20, 50)) -> None:
    """Each deterministic solver's distance to the ODE's solution, stood in for by DDIM 500 from the same x_T:
    the RMS of the final latents' difference, without guidance and at the model's w."""
    prompts = FidelityPrompts.heldout(count, bench.resolution, seed=SPLIT_SEED).captions
    x_T = bench.noise(count)

    def final(sampler: str, steps: int, w: float) -> torch.Tensor:
        return bench.pipe(prompts, sampler=sampler, num_inference_steps=steps, guidance_scale=w, latents=x_T,
                          eta=eta_of(sampler), output_type="latent", progress=False).images  # fmt: skip

    print(f"\n### Distance to DDIM 500 (latent RMS), {count} held-out captions, the same x_T\n")
    print("| w | steps | DDIM | DPM-Solver++(2M) | DPM-Solver++ / DDIM |")
    print("| --- | --- | --- | --- | --- |")
    for w in (1.0, bench.pipe.defaults.guidance_scale):
        reference = final("ddim", 500, w)
        for steps in steps_list:
            ddim, dpm = ((final(s, steps, w) - reference).pow(2).mean().sqrt().item() for s in ("ddim", "dpmpp_2m"))
            print(f"| {w:g} | {steps} | {ddim:.4f} | {dpm:.4f} | {dpm / ddim:.2f} |")


def inversion(bench: Bench, count: int, steps_list: tuple[int, ...] = (50, 100, 200)) -> None:
    done = bench.results.rows("inversion", bench.settings(images=count, steps=list(steps_list)))
    scenes, b = heldout_scenes(count, bench.resolution), bench.batch_size
    original, captions = image_batch([s.image for s in scenes]), [s.caption for s in scenes]
    reconstructed = bench.reconstruct(original)
    for steps in steps_list:
        if f"{steps}" in done:
            continue
        invert = {"num_inference_steps": steps, "guidance_scale": 1.0, "progress": False}
        x_T = [bench.pipe.invert(original[i : i + b], captions[i : i + b], **invert) for i in range(0, count, b)]
        ddim = {"sampler": "ddim", "eta": 0.0, "num_inference_steps": steps}
        run = bench.generate(captions, {"latents": torch.cat(x_T)}, guidance_scale=1.0, **ddim)
        regenerated = channels_first(run.images)
        against_reconstruction = psnr(regenerated, reconstructed)
        bench.results.add("inversion", f"{steps}", {
            "mean": against_reconstruction.mean().item(),
            "min": against_reconstruction.min().item(),
            "at_least_30": percent((against_reconstruction >= 30).tolist()),
            "vs_rendering": psnr(regenerated, original).mean().item(),
        })  # fmt: skip
    rendering = psnr(reconstructed, original)
    print(f"\n### DDIM inversion: {count} held-out renderings, w = 1, DDIM each way; PSNR in dB\n")
    columns = [
        ("mean", "vs reconstruction, mean", ".2f"),
        ("min", "min", ".2f"),
        ("at_least_30", "share >= 30 dB", ".1f"),
        ("vs_rendering", "vs the rendering, mean", ".2f"),
    ]
    print(table("steps each way", [(f"{n}", done[f"{n}"]) for n in steps_list], columns))
    print(f"\nThe reconstruction itself is {rendering.mean().item():.2f} dB from the rendering (min "
          f"{rendering.min().item():.2f}). Goal: >= 30 dB against the reconstruction.")  # fmt: skip


def img2img(bench: Bench, count: int, strengths: list[float], guidance_scale: float | None) -> None:
    w = bench.pipe.defaults.guidance_scale if guidance_scale is None else guidance_scale
    scenes = heldout_scenes(count, bench.resolution)
    backgrounds = [next_color(BACKGROUNDS, s.params["background"], avoid=s.params["color"]) for s in scenes]
    prompts = [edit_caption(s.caption, s.params, background=b) for s, b in zip(scenes, backgrounds, strict=True)]
    section = "img2img" if w == bench.pipe.defaults.guidance_scale else f"img2img w={w:g}"
    done = bench.results.rows(section, bench.settings(scenes=count, seed=SEED, guidance_scale=w, **DDIM_50))
    images = {"image": image_batch([s.image for s in scenes])}
    for strength in strengths:
        tile = f"img2img_w{w:g}_{strength:g}"
        if f"{strength:g}" in done and bench.keep(tile) is not None:
            continue
        run = bench.generate(prompts, images, strength=strength, guidance_scale=w, **DDIM_50)
        bench.keep(tile, run.images[:PICTURE_SCENES])
        readings = read(bench.probe, run.images)
        kept = {k: [r == s.params[k] for r, s in zip(readings[k], scenes, strict=True)] for k in ("shape", "position")}
        row = {
            "shape": percent(kept["shape"]),
            "position": percent(kept["position"]),
            "both": percent([a and b for a, b in zip(kept["shape"], kept["position"], strict=True)]),
            "background": share(readings["background"], backgrounds),
            "unet_evals_per_image": run.unet_evals_per_image,
        }
        row["meets_goal"] = row["both"] >= 80 and row["background"] >= 90
        bench.results.add(section, f"{strength:g}", row)
    print(f"\n### img2img: {count} held-out renderings, caption with a new background colour, DDIM 50, w = {w:g}\n")
    columns = [
        ("shape", "shape unchanged", ".1f"),
        ("position", "position unchanged", ".1f"),
        ("both", "both unchanged", ".1f"),
        ("background", "background changed", ".1f"),
        ("unet_evals_per_image", "U-Net evals / image", ".0f"),
        ("meets_goal", "meets the goal", ""),
    ]
    print(table("strength", [(f"{s:g}", done[f"{s:g}"]) for s in strengths], columns))
    meeting = ", ".join(f"{s:g}" for s in strengths if done[f"{s:g}"]["meets_goal"]) or "none"
    print(f"\nGoal: shape and position unchanged >= 80%, background changed >= 90%. Met at strength: {meeting}.")
    outputs = [tiles(bench.keep(f"img2img_w{w:g}_{s:g}")) for s in strengths]
    grid = [t for i, s in enumerate(scenes[:PICTURE_SCENES]) for t in (s.image, *(o[i] for o in outputs))]
    path = bench.picture("img2img_strength", grid, rows=min(count, PICTURE_SCENES))
    print(f"{path}: one row per scene; columns: the source, then strength {', '.join(f'{s:g}' for s in strengths)}.")


def inpainting(bench: Bench, count: int, pad: int, resample: int) -> None:
    f = bench.pipe.vae_scale_factor
    scenes = heldout_scenes(count, bench.resolution)
    colors = [next_color(COLORS, s.params["color"], avoid=s.params["background"]) for s in scenes]
    prompts = [edit_caption(s.caption, s.params, color=c) for s, c in zip(scenes, colors, strict=True)]
    masks, original = shape_masks(scenes, bench.resolution, pad), image_batch([s.image for s in scenes])
    settings = bench.settings(scenes=count, pad=pad, resample=resample, seed=SEED, **DDIM_50)
    done = bench.results.rows("inpainting", settings)
    if "autoencoder reconstruction" not in done:
        reconstructed = bench.reconstruct(original)
        bench.results.add("inpainting", "autoencoder reconstruction", masked_errors(reconstructed, original, masks, f))
    jumps_of = sorted({1, resample})
    variants = [(jumps, True) for jumps in jumps_of] + [(resample, False)]  # and the decoder's own pixels
    labels = {(j, paste): f"ddim 50, resample {j}" + ("" if paste else ", not pasted") for j, paste in variants}
    for (jumps, paste), label in labels.items():
        if label in done and (not paste or bench.keep(f"inpainting_{jumps}") is not None):
            continue
        run = bench.generate(
            prompts, {"image": original, "mask_image": masks}, strength=1.0, resample=jumps, paste_unmasked=paste,
            **DDIM_50,
        )  # fmt: skip
        if paste:
            bench.keep(f"inpainting_{jumps}", run.images[:PICTURE_SCENES])
        readings = read(bench.probe, run.images)
        row = {
            "new_colour": share(readings["color"], colors),
            "shape": share(readings["shape"], [s.params["shape"] for s in scenes]),
            "unet_evals_per_image": run.unet_evals_per_image,
        }
        row |= masked_errors(channels_first(run.images), original, masks, f)
        bench.results.add("inpainting", label, row)
    print(f"\n### Inpainting: {count} held-out renderings, the shape's box (+{pad} px) repainted in a new colour\n")
    columns = [
        ("new_colour", "probe reads the new colour", ".1f"),
        ("shape", "shape unchanged", ".1f"),
        ("unet_evals_per_image", "U-Net evals / image", ".0f"),
        ("outside", "MSE outside the mask", ".2e"),
        ("far", f"MSE >= {f} px from the mask", ".2e"),
    ]
    rows = [*labels.values(), "autoencoder reconstruction"]
    print(table("sampler", [(label, done[label]) for label in rows], columns))
    print("\nGoal: the probe reads the new colour; outside the mask, an error within the autoencoder's own.")
    print("The pipeline pastes the input's pixels outside the mask by default (paste_unmasked), so its error")
    print("there is 0; the 'not pasted' row is the decoder's own image of the kept latents.")
    repainted = [tiles(bench.keep(f"inpainting_{j}")) for j in jumps_of]
    mask_tiles = to_pil(masks[:PICTURE_SCENES] * 2 - 1)
    grid = [
        t for i, s in enumerate(scenes[:PICTURE_SCENES]) for t in (s.image, mask_tiles[i], *(r[i] for r in repainted))
    ]
    path = bench.picture("inpainting", grid, rows=min(count, PICTURE_SCENES))
    order = " and ".join(map(str, jumps_of))
    print(f"{path}: one row per scene: the rendering, the mask (white = repaint), inpainted with resample {order}.")


def pictures(bench: Bench, frames: int = 8) -> None:
    prompts = FidelityPrompts.heldout(2, bench.resolution, seed=SPLIT_SEED).captions
    bench.results.rows("pictures", bench.settings())
    grid = []
    for sampler in PICTURE_SAMPLERS:
        for steps in PICTURE_STEPS:
            kwargs = {"sampler": sampler, "num_inference_steps": steps, "eta": eta_of(sampler)}
            grid += tiles(bench.generate(prompts[:1], {"latents": bench.noise(1)}, **kwargs).images)
    path = bench.picture("solver_steps", grid, rows=len(PICTURE_SAMPLERS))
    legend = (
        f"prompt {prompts[0]!r}, one x_T, the model's default w; rows (top to bottom) {', '.join(PICTURE_SAMPLERS)}; "
        f"columns (left to right) {', '.join(map(str, PICTURE_STEPS))} steps"
    )
    bench.results.add("pictures", "solver_steps", {"path": str(path), "legend": legend})
    print(f"\n{path}: {legend}.")

    cond, uncond = bench.pipe.encode_prompt(prompts)  # (2, L, D) each
    a, b = bench.noise(1, seed=0), bench.noise(1, seed=1)
    weights = torch.linspace(0, 1, frames).tolist()
    latents = torch.cat([slerp(a, b, w) for w in weights])  # (frames, C, h, w)
    embeds = torch.stack([(1 - w) * cond[0] + w * cond[1] for w in weights])  # (frames, L, D)
    images = bench.pipe(prompt_embeds=embeds, negative_prompt_embeds=uncond[:1], latents=latents, **DDIM_50,
                        output_type="np", progress=False).images  # fmt: skip
    path = bench.picture("interpolation", tiles(images), rows=1)
    legend = (
        f"{frames} frames from {prompts[0]!r} (seed 0, left) to {prompts[1]!r} (seed 1, right): slerp of x_T, "
        "linear text embeddings; DDIM 50, the model's default w"
    )
    bench.results.add("pictures", "interpolation", {"path": str(path), "legend": legend})
    print(f"{path}: {legend}.")


# ---- output --------------------------------------------------------------------------------------------


def sampler_steps(text: str) -> tuple[str, int]:
    """A --rows entry, "dpmpp_2m:10", as ("dpmpp_2m", 10)."""
    sampler, _, steps = text.partition(":")
    if sampler not in SAMPLER_NAMES or not steps.isdigit():
        names = ", ".join(SAMPLER_NAMES)
        raise argparse.ArgumentTypeError(f"{text!r} is not SAMPLER:STEPS with SAMPLER one of {names}")
    return sampler, int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/quickstart/pipeline"))
    parser.add_argument(
        "--probe",
        type=Path,
        default=Path("runs/quickstart/evaluation/probe"),
        help="probe folder; a probe is trained and saved there if it holds none of this config",
    )
    parser.add_argument("--probe-steps", type=int, default=ProbeConfig.steps, help="training steps of the probe")
    parser.add_argument("--out", type=Path, default=Path("runs/generation_benchmark"))
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the pictures go")
    parser.add_argument("--section", action="append", choices=SECTIONS, help="repeatable; default: all")
    parser.add_argument("--captions", type=int, default=192, help="solvers: held-out captions")
    parser.add_argument(
        "--rows",
        nargs="+",
        type=sampler_steps,
        default=[sampler_steps(r) for r in SOLVER_ROWS],
        metavar="SAMPLER:STEPS",
        help="solvers: the rows besides DDIM 50",
    )
    parser.add_argument("--inversion-images", type=int, default=32)
    parser.add_argument("--edit-scenes", type=int, default=192, help="img2img and inpainting: held-out scenes")
    parser.add_argument("--strengths", nargs="+", type=float, default=list(STRENGTHS), help="img2img: strengths")
    parser.add_argument("--edit-guidance", type=float, default=None, help="img2img: w (default: the model's)")
    parser.add_argument("--convergence-captions", type=int, default=16)
    parser.add_argument("--mask-pad", type=int, default=2, help="inpainting: pixels added around the shape's box")
    parser.add_argument("--resample", type=int, default=3, help="inpainting: RePaint jumps of the second row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timing: interleaved rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    probe, probe_accuracy = load_or_train_probe(
        ProbeConfig(resolution=pipe.default_size, steps=args.probe_steps), args.probe
    )
    print("probe on held-out renderings: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in probe_accuracy.items()))
    bench = Bench(
        pipe, probe, Results(args.out / "results.json"), str(args.model), args.out, args.docs, args.batch_size
    )
    runners = {
        "solvers": lambda: solvers(bench, args.captions, args.rows),
        "timing": lambda: timing(bench, args.batch_size, args.repeats),
        "inversion": lambda: inversion(bench, args.inversion_images),
        "img2img": lambda: img2img(bench, args.edit_scenes, args.strengths, args.edit_guidance),
        "convergence": lambda: convergence(bench, args.convergence_captions),
        "inpainting": lambda: inpainting(bench, args.edit_scenes, args.mask_pad, args.resample),
        "pictures": lambda: pictures(bench),
    }
    for section in args.section or SECTIONS:
        began = time.perf_counter()
        with torch.inference_mode():
            runners[section]()
        log.info("%s: %.1f min", section, (time.perf_counter() - began) / 60)


if __name__ == "__main__":
    main()
