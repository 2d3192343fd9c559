"""What the text encoder tells the U-Net about each attribute of a shapes caption, read two ways.

1. **Distances.** For each attribute, pairs of captions that differ in that attribute alone (same scene, same
   template, another value): the mean L2 distance between their (L, D) conditioning tensors. An encoder that puts
   "top left" and "bottom right" close together gives the U-Net's cross-attention little to place objects with.
2. **A linear probe.** Ridge regression from each caption's token-averaged conditioning (D features) to one-hot
   attribute classes, fitted on captions of some scenes and scored on captions of others: whether the attribute
   can be read linearly from a position-agnostic summary, as a cross-attention read is a weighted average.

The reference scale is `norm`, the mean L2 norm of one caption's conditioning. Both readings depend on the
encoder alone (no U-Net, no image), so they show where the text pathway loses an attribute before any sampling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from conditioning import TextEncoder
from ldm.data.shapes import CAPTION_TEMPLATES, COLORS, POSITIONS, SHAPES, SIZES, sample_scene

ATTRIBUTES = ("color", "shape", "background", "size", "position")
_VALUES = {"color": COLORS, "shape": SHAPES, "background": COLORS, "size": SIZES, "position": POSITIONS}
PAIRS_PER_ATTRIBUTE = 64
PROBE_FIT, PROBE_TEST = 768, 256  # captions the probe is fitted on / scored on (scenes drawn apart)
RIDGE = 1e-2  # the probe's ridge, relative to the mean feature variance


def caption_of(scene: dict[str, Any], template: str) -> str:
    """The caption of `scene` in `template` (the data's own phrasing)."""
    return template.format(**{k: scene[k] for k in ATTRIBUTES})


def attribute_pairs(attribute: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` caption pairs that differ in `attribute` alone: a scene and the same scene with another value,
    in the same template (a colour never equal to the background, nor the background to the colour). The other
    value has as many words ("top left" pairs with "bottom right", "center" with "left"), so every other word
    keeps its token position and the distance is the attribute's alone, not a shift of the words after it."""
    if attribute not in _VALUES:
        raise ValueError(f"attribute: unknown {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    rng = np.random.default_rng([seed, ATTRIBUTES.index(attribute)])
    pairs = []
    for _ in range(count):
        scene = sample_scene(rng)
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        forbidden = {
            scene[attribute],
            *(scene[k] for k in ("color", "background") if attribute in ("color", "background")),
        }
        words = len(scene[attribute].split())
        others = [v for v in _VALUES[attribute] if v not in forbidden and len(v.split()) == words]
        changed = dict(scene, **{attribute: others[int(rng.integers(len(others)))]})
        pairs.append((caption_of(scene, template), caption_of(changed, template)))
    return pairs


def labelled_captions(
    count: int, seed: int, exclude: frozenset[str] = frozenset()
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """`count` random captions, none of them in `exclude` (the probe is scored on captions it was not fitted
    on), and each one's class index per attribute."""
    rng = np.random.default_rng([seed, 99])
    captions, labels = [], {k: [] for k in ATTRIBUTES}
    while len(captions) < count:
        scene = sample_scene(rng)
        caption = caption_of(scene, CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))])
        if caption in exclude:
            continue
        captions.append(caption)
        for k in ATTRIBUTES:
            labels[k].append(_VALUES[k].index(scene[k]))
    return captions, {k: torch.tensor(v) for k, v in labels.items()}


@torch.no_grad()
def _encode(encoder: TextEncoder, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat(
        [encoder.encode(captions[i : i + batch_size]).float().cpu() for i in range(0, len(captions), batch_size)]
    )


def ridge_probe_accuracy(
    fit: torch.Tensor, fit_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, classes: int
) -> float:
    """Accuracy on `test` of the ridge regression from features (N, D) to one-hot classes fitted on `fit`:
    W = (X^T X + lambda I)^-1 X^T Y on centred features, with lambda = RIDGE * D * mean variance."""
    mean = fit.mean(0)
    x, x_test = (fit - mean).double(), (test - mean).double()
    y = torch.nn.functional.one_hot(fit_labels, classes).double()
    ridge = RIDGE * x.pow(2).mean() * x.shape[1]
    weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (y - y.mean(0)))
    return float(((x_test @ weights).argmax(1) == test_labels).double().mean())


def text_pathway(encoder: TextEncoder, seed: int = 0) -> dict[str, Any]:
    """Per attribute: the mean conditioning distance of captions differing in it alone (`distance`, also as a
    fraction of `norm`) and the linear probe's held-out accuracy (`probe`); plus `norm` and the probe's chance."""
    was_training = encoder.training
    encoder.eval()  # dropout off; the weights are read, not changed
    try:
        fit_captions, fit_labels = labelled_captions(PROBE_FIT, seed)
        test_captions, test_labels = labelled_captions(PROBE_TEST, seed + 1, exclude=frozenset(fit_captions))
        fit, test = _encode(encoder, fit_captions), _encode(encoder, test_captions)
        result: dict[str, Any] = {"norm": float(fit.flatten(1).norm(dim=1).mean())}
        fit_pooled, test_pooled = fit.mean(1), test.mean(1)  # (N, D): the token-averaged conditioning
        for attribute in ATTRIBUTES:
            first, second = zip(*attribute_pairs(attribute, PAIRS_PER_ATTRIBUTE, seed), strict=True)
            distance = float(
                (_encode(encoder, list(first)) - _encode(encoder, list(second))).flatten(1).norm(dim=1).mean()
            )
            classes = len(_VALUES[attribute])
            probe = ridge_probe_accuracy(
                fit_pooled, fit_labels[attribute], test_pooled, test_labels[attribute], classes
            )
            result[attribute] = {
                "distance": distance,
                "relative_distance": distance / result["norm"],
                "probe": probe,
                "chance": 1.0 / classes,
            }
    finally:
        encoder.train(was_training)
    return result


def scalar_logs(pathway: dict[str, Any], prefix: str = "text") -> dict[str, float]:
    """The diagnostic as flat scalars for a tracker: text/<attribute>_distance, text/<attribute>_probe."""
    logs = {f"{prefix}/norm": pathway["norm"]}
    for attribute in ATTRIBUTES:
        logs[f"{prefix}/{attribute}_distance"] = pathway[attribute]["distance"]
        logs[f"{prefix}/{attribute}_probe"] = pathway[attribute]["probe"]
    return logs


def summary_line(pathway: dict[str, Any]) -> str:
    """One line for a log: each attribute's distance and probe accuracy."""
    cells = [f"{a} {pathway[a]['distance']:.1f} ({100 * pathway[a]['probe']:.0f}%)" for a in ATTRIBUTES]
    return f"text pathway, distance (probe) at norm {pathway['norm']:.1f}: " + ", ".join(cells)
