"""Write the built-in shapes data as an image folder (PNG files + metadata.jsonl), the layout users bring their own
images in: a stand-in for "your own data" that `ldm train-diffusion` and `ldm evaluate --data` read like any other.

    PYTHONPATH=. python3 benchmarks/shapes_image_folder.py --out runs/shapes_folder \\
        --shapes circle square triangle cross

writes OUT/train (the train split) and OUT/heldout (the held-out split), each with metadata.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from ldm.data.shapes import SHAPES, ShapesDataset
from ldm.images import to_pil


def write_split(dataset: ShapesDataset, folder: Path) -> None:
    """Every item of `dataset` as folder/NNNNNN.png, and its caption in folder/metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as metadata:
        for i in tqdm(range(len(dataset)), desc=folder.name):
            item = dataset[i]
            name = f"{i:06d}.png"
            to_pil(item["pixel_values"][None])[0].save(folder / name)
            metadata.write(json.dumps({"file_name": name, "text": item["caption"]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    for split, count in (("train", args.train), ("heldout", args.heldout)):
        write_split(ShapesDataset(count, args.resolution, split, shapes=args.shapes), args.out / split)


if __name__ == "__main__":
    main()
