"""Prompt adherence ablation: train one variant of a stage with config overrides, then read it with the probe.

Stage 1 (`--stage 1`): `ldm train-autoencoder` with the overrides; the row is the probe's accuracy on the
reconstructions of 1000 held-out renderings (what stage 2 can at best draw) and the held-out PSNR.
Stage 2 (`--stage 2 --vae FOLDER`): `ldm train-diffusion` on that VAE with the overrides; the row is the probe's
accuracy on DDIM-50 images of 96 held-out captions and 96 captions of novel combinations (the compositional
split), at w = 1 and at the model's default guidance. Every variant of one table gets the same `--steps`.

    PYTHONPATH=. python3 benchmarks/prompt_adherence.py --stage 2 --vae runs/ablation/s1_base/vae --steps 900 \\
        --variant base --variant v_zero_snr noise.prediction=v noise.zero_terminal_snr=true \\
        noise.timestep_spacing=trailing

`--read-only` reads folders trained before (a quickstart's run, with its pipeline/ linked beside its metrics.json).
Each row appends a JSON line to OUT/results.jsonl (so an interrupted table keeps its rows) and the table is
printed at the end. The probe is trained once and kept in OUT/probe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.evaluation.fidelity import GEOMETRIC, JUDGED, FidelityPrompts, prompt_fidelity, sweep_point
from ldm.evaluation.probe import ProbeConfig, load_or_train_probe

ROOT = Path(__file__).resolve().parents[1]
NO_EXTRAS = ["train.log_with=none", "train.sample_every=100000", "train.checkpoint_every=100000"]


def train(stage: int, out: Path, steps: int, overrides: list[str], vae: str | None) -> float:
    """Run the stage's training command; its wall time in seconds."""
    command = "train-autoencoder" if stage == 1 else "train-diffusion"
    settings = [f"train.steps={steps}", *NO_EXTRAS, *([f"autoencoder={vae}"] if vae else []), *overrides]
    args = [sys.executable, "-m", "ldm", command, "--output-dir", str(out)]
    args += [arg for setting in settings for arg in ("--set", setting)]
    began = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w", encoding="utf-8") as log:  # names may hold dots (logit0.5)
        subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - began


def read_stage_1(out: Path, probe: torch.nn.Module) -> dict[str, float]:
    from diffusers import AutoencoderKL

    from autoencoder.model import KLAutoencoder
    from ldm.data.shapes import ShapesDataset
    from ldm.evaluation.evaluate import reconstruction_probe_accuracy

    vae = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True).eval()
    heldout = ShapesDataset(1000, vae.config.sample_size, "heldout")  # the resolution stage 1 trained at
    accuracy = reconstruction_probe_accuracy(KLAutoencoder(vae).eval(), probe, heldout)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {"psnr": metrics["psnr"]} | {f"recon {k}": 100 * v for k, v in accuracy.items()}


def read_stage_2(out: Path, probe: torch.nn.Module, num_prompts: int) -> dict[str, float]:
    from ldm.generation import LatentDiffusionPipeline

    pipeline = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    row = {}
    for split in ("heldout", "compositional"):
        prompts = FidelityPrompts.of_split(split, num_prompts, pipeline.default_size)
        for w in (1.0, pipeline.defaults.guidance_scale):
            accuracy = prompt_fidelity(pipeline, probe, prompts, sweep_point(w, 50, "ddim", 0))
            row |= {f"{split} w={w:g} {k}": 100 * accuracy[k] for k in (*JUDGED, GEOMETRIC)}
    pathway = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["text_pathway"]
    return row | {f"text {k} distance": v["distance"] for k, v in pathway.items() if k != "norm"}


def table(rows: list[dict]) -> str:
    columns = [key for key in rows[0] if key not in ("variant", "overrides")]
    lines = ["| variant | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for row in rows:
        lines.append(f"| {row['variant']} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--steps", type=int, required=True, help="training steps of every variant")
    parser.add_argument("--vae", help="stage 2: the stage-1 VAE folder every variant trains on")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"))
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--probe-steps", type=int, default=ProbeConfig.steps, help="training steps of the probe")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--read-only", action="store_true", help="read the variants' existing OUT/sSTAGE_NAME folders")
    args = parser.parse_args()
    if args.stage == 2 and not args.vae and not args.read_only:
        parser.error("--stage 2 needs --vae")
    args.out.mkdir(parents=True, exist_ok=True)
    probe, _ = load_or_train_probe(ProbeConfig(steps=args.probe_steps), args.out / "probe")
    rows = []
    for name, *overrides in args.variant:
        out = args.out / f"s{args.stage}_{name}"
        if args.read_only:  # a run trained before (e.g. by `ldm quickstart`, linked here): its own training time
            seconds = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["train_seconds"]
        else:
            seconds = train(args.stage, out, args.steps, overrides, args.vae)
        read = read_stage_1(out, probe) if args.stage == 1 else read_stage_2(out, probe, args.num_prompts)
        row = {"variant": name, "overrides": overrides, "train minutes": seconds / 60} | read
        with open(args.out / "results.jsonl", "a", encoding="utf-8") as results:
            results.write(json.dumps(row) + "\n")
        rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
