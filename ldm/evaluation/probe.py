"""A small CNN that reads the attributes of a shapes image: the judge of prompt fidelity.

It is trained on rendered shapes images only (never on generated ones), with mild blur and noise so a
slightly soft generated image is not out of its distribution, and its accuracy on the held-out renderings
is reported next to every fidelity number: a generated image can only be judged as well as the probe reads
a real one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesDataset, check_colors, check_shapes


def attribute_classes(shapes: tuple[str, ...] = SHAPES, colors: tuple[str, ...] = COLORS) -> dict[str, tuple[str, ...]]:
    """Attribute -> its class names, for data of `shapes` and `colors`; "color" is the shape's colour."""
    shapes, colors = tuple(shapes), tuple(colors)
    return {"shape": shapes, "color": colors, "background": colors, "size": SIZES, "position": POSITIONS}


ATTRIBUTES: dict[str, tuple[str, ...]] = attribute_classes()  # the default data's


@dataclass
class ProbeConfig:
    resolution: int = 32
    train_samples: int = 20000
    heldout_samples: int = 1000
    steps: int = 5000  # 2000 left colour and size short of what the probe can read (docs/prompt_adherence.md)
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))  # the shapes it tells apart
    colors: list[str] = field(default_factory=lambda: list(COLORS))  # and the colours

    def __post_init__(self) -> None:
        self.shapes = list(check_shapes(self.shapes, "probe.shapes"))
        self.colors = list(check_colors(self.colors, "probe.colors"))


class AttributeProbe(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> one logit vector per attribute."""

    def __init__(self, width: int = 32, shapes: tuple[str, ...] = SHAPES, colors: tuple[str, ...] = COLORS) -> None:
        super().__init__()
        self.attributes = attribute_classes(shapes, colors)

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(2),  # keeps a coarse layout: position needs to know where, not just what
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(16 * width, len(v)) for k, v in self.attributes.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, list[str]]:
        """Class names per attribute for a batch of images in [-1, 1]."""
        self.eval()
        logits = self(images)
        return {k: [names[i] for i in logits[k].argmax(-1).tolist()] for k, names in self.attributes.items()}


def shapes_tensors(dataset: ShapesDataset) -> tuple[Tensor, dict[str, Tensor]]:
    """All images (N, 3, H, W) of a shapes split and their attribute class indices (among the dataset's shapes)."""
    classes = attribute_classes(dataset.shapes, dataset.colors)
    images, labels = [], {k: [] for k in classes}
    for i in range(len(dataset)):
        item = dataset[i]
        images.append(item["pixel_values"])
        for k, names in classes.items():
            labels[k].append(names.index(item["attributes"][k]))
    return torch.stack(images), {k: torch.tensor(v) for k, v in labels.items()}


def soften(images: Tensor, generator: torch.Generator) -> Tensor:
    """The training augmentation: a 3x3 binomial blur on half the batch, then N(0, 0.05^2) noise."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 16
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    pick = torch.rand(images.shape[0], 1, 1, 1, generator=generator) < 0.5
    mixed = torch.where(pick, blurred, images)
    return mixed + 0.05 * torch.randn(mixed.shape, generator=generator)


def accuracy(probe: AttributeProbe, images: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    """Per-attribute accuracy of the probe on labelled images."""
    probe.eval()
    with torch.no_grad():
        logits = probe(images)
    return {k: (logits[k].argmax(-1) == labels[k]).float().mean().item() for k in labels}


def train_probe(cfg: ProbeConfig) -> tuple[AttributeProbe, dict[str, float]]:
    """Train on rendered train-split shapes; returns the probe and its accuracy on held-out renderings."""
    generator = torch.Generator().manual_seed(cfg.seed)
    # The judge of every combination, the novel ones included (the model never trains on those).
    kinds = {"shapes": tuple(cfg.shapes), "colors": tuple(cfg.colors)}
    train = ShapesDataset(cfg.train_samples, cfg.resolution, "train", seed=cfg.seed + 1, include_novel=True, **kinds)
    images, labels = shapes_tensors(train)
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        probe = AttributeProbe(**kinds)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    probe.train()
    for _ in tqdm(range(cfg.steps), desc="attribute probe"):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=generator)
        logits = probe(soften(images[idx], generator))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    heldout = ShapesDataset(cfg.heldout_samples, cfg.resolution, "heldout", include_novel=True, **kinds)
    heldout_images, heldout_labels = shapes_tensors(heldout)
    return probe.eval(), accuracy(probe, heldout_images, heldout_labels)


def save_probe(probe: AttributeProbe, heldout_accuracy: dict[str, float], cfg: ProbeConfig, folder: Path) -> None:
    """probe.safetensors (weights, BatchNorm statistics included) and probe.json (settings and accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(folder / "probe.safetensors"))
    info = {"config": asdict(cfg), "heldout_accuracy": heldout_accuracy}
    (folder / "probe.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def load_or_train_probe(cfg: ProbeConfig, folder: Path) -> tuple[AttributeProbe, dict[str, float]]:
    """The probe saved in `folder` when it was trained with `cfg`, else a newly trained (and saved) one."""
    info_path = folder / "probe.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        # Probes saved before `shapes` and `colors` existed were of the default sets.
        saved = {"shapes": list(SHAPES), "colors": list(COLORS)} | info.get("config", {})
        if saved == asdict(cfg):
            probe = AttributeProbe(shapes=tuple(cfg.shapes), colors=tuple(cfg.colors))
            probe.load_state_dict(load_file(str(folder / "probe.safetensors")))
            return probe.eval(), info["heldout_accuracy"]
    probe, heldout_accuracy = train_probe(cfg)
    save_probe(probe, heldout_accuracy, cfg, folder)
    return probe, heldout_accuracy
