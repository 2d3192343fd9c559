"""Fine-tuning on what the model never saw: how well each model draws the cross and pink, and what it keeps.

For each model folder, DDIM-50 images at the folder's default guidance, read by an attribute probe that knows the
four shapes and nine colours of configs/finetune_shapes_new.yaml (trained once on renderings, kept in OUT/probe):
- "cross": held-out captions of crosses (a shape the quickstart's data never had);
- "pink": held-out captions of pink shapes (a colour it never had);
- "old": held-out captions of the default data (the captions `ldm evaluate` reads).
The same seed for every model, so the rows differ only by the weights. The probe's reading of the autoencoder's
reconstructions of each set (`--ceiling`) is what stage 1 lets stage 2 draw at best.

    PYTHONPATH=. python3 benchmarks/finetune_new_concepts.py --out runs/finetune_bench --ceiling \\
        --model base=runs/quickstart/pipeline --model full=runs/finetune_new/pipeline \\
        --model lora=runs/finetune_new_lora/pipeline

Each row is appended to OUT/results.jsonl and the table printed at the end.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset
from ldm.evaluation.evaluate import reconstruction_probe_accuracy
from ldm.evaluation.fidelity import JUDGED, FidelityPrompts, prompt_fidelity, sweep_point
from ldm.evaluation.probe import ProbeConfig, accuracy, load_or_train_probe, shapes_tensors
from ldm.generation import LatentDiffusionPipeline

NEW = {"shapes": (*SHAPES, "cross"), "colors": (*COLORS, "pink")}
RESOLUTION = 32


def heldout_prompts(count: int, keep: Callable[[dict[str, str]], bool], seed: int = 1) -> FidelityPrompts:
    """`count` held-out scenes of the extended data whose attributes pass `keep`."""
    data = ShapesDataset(20 * count, RESOLUTION, "heldout", seed=seed, **NEW)
    chosen = []
    for i in range(len(data)):
        item = data[i]
        if keep(item["attributes"]):
            chosen.append(item)
            if len(chosen) == count:
                return FidelityPrompts([c["caption"] for c in chosen], [c["attributes"] for c in chosen])
    raise RuntimeError(f"only {len(chosen)} matching scenes among {len(data)} held-out ones")


PROMPT_SETS: dict[str, Callable[[dict[str, str]], bool]] = {
    "cross": lambda a: a["shape"] == "cross",
    "pink": lambda a: a["color"] == "pink",
}


def probe_on_renderings(probe: torch.nn.Module) -> dict[str, float]:
    """The probe's accuracy on 1000 held-out renderings of the extended data, and on its crosses and pinks."""
    images, labels = shapes_tensors(ShapesDataset(1000, RESOLUTION, "heldout", **NEW))
    scores = accuracy(probe, images, labels)
    for name, attribute, value in (("crosses", "shape", "cross"), ("pinks", "color", "pink")):
        picked = labels[attribute] == probe.attributes[attribute].index(value)
        scores[f"{attribute}_of_{name}"] = accuracy(probe, images[picked], {attribute: labels[attribute][picked]})[
            attribute
        ]
    return scores


def autoencoder_ceiling(probe: torch.nn.Module, folder: str, count: int) -> dict[str, Any]:
    """The probe's accuracy on the VAE's reconstructions of held-out crosses and pinks (posterior mean)."""
    from autoencoder.model import KLAutoencoder

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    autoencoder = KLAutoencoder(pipe.vae).eval()
    ceiling = {}
    for name, keep in PROMPT_SETS.items():
        data = ShapesDataset(20 * count, RESOLUTION, "heldout", **NEW)
        picked = [i for i in range(len(data)) if keep(data[i]["attributes"])][:count]
        subset = torch.utils.data.Subset(data, picked)
        subset.shapes, subset.colors = data.shapes, data.colors  # what shapes_tensors labels by
        ceiling[name] = reconstruction_probe_accuracy(autoencoder, probe, subset)  # type: ignore[arg-type]
    return ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a model folder")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_bench"))
    parser.add_argument("--old-captions", type=int, default=384)
    parser.add_argument("--new-captions", type=int, default=192, help="captions of crosses, and of pinks")
    parser.add_argument("--probe-steps", type=int, default=5000)
    parser.add_argument("--ceiling", action="store_true", help="also read the first model's VAE reconstructions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = dict(spec.split("=", 1) for spec in args.model)

    kinds = {key: list(value) for key, value in NEW.items()}
    probe, _ = load_or_train_probe(ProbeConfig(steps=args.probe_steps, **kinds), args.out / "probe")
    print(
        "probe on held-out renderings:",
        json.dumps({k: round(100 * v, 1) for k, v in probe_on_renderings(probe).items()}),
    )
    if args.ceiling:
        ceiling = autoencoder_ceiling(probe, next(iter(models.values())), args.new_captions)
        print("probe on the VAE's reconstructions:", json.dumps(ceiling))
    sets = {name: heldout_prompts(args.new_captions, keep) for name, keep in PROMPT_SETS.items()}
    sets["old"] = FidelityPrompts.heldout(args.old_captions)
    rows = []
    for name, folder in models.items():
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
        point = sweep_point(pipe.defaults.guidance_scale, 50, "ddim", args.seed)
        row = {"model": name, "folder": folder, "guidance_scale": point.guidance_scale}
        for which, prompts in sets.items():
            row[which] = {k: 100 * v for k, v in prompt_fidelity(pipe, probe, prompts, point).items()}
        rows.append(row)
        with (args.out / "results.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    print(
        f"\n{args.new_captions} captions each of crosses and pinks, {args.old_captions} old; DDIM 50; % read as asked"
    )
    columns = ["cross: shape", "cross: colour", "pink: colour", "pink: shape", *(f"old: {k}" for k in JUDGED)]
    print("| model | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for row in rows:
        cells = [row["cross"]["shape"], row["cross"]["color"], row["pink"]["color"], row["pink"]["shape"]]
        cells += [row["old"][k] for k in JUDGED]
        print(f"| {row['model']} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
