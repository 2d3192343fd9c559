"""The synthetic shapes dataset: determinism, captions that match the picture, disjoint splits, antialiasing."""

import re

import numpy as np
import pytest
import torch

from ldm.data import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapesDataset, collate_examples
from ldm.data.shapes import (
    COLOR_RGB,
    HELDOUT_PERCENT,
    NOVEL_COMBINATIONS,
    PALETTE,
    POSITION_CENTER,
    combination,
    image_split,
    render_scene,
    sample_scene,
)


def test_items_are_deterministic_from_seed_split_and_index():
    a, b = ShapesDataset(50, 32, seed=7), ShapesDataset(50, 32, seed=7)
    for i in (0, 13, 49):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
        assert a[i]["caption"] == b[i]["caption"]
    uncached = ShapesDataset(50, 32, seed=7, cache=False)
    for _ in range(2):  # the second pass comes from the cache
        assert all(torch.equal(a[i]["pixel_values"], uncached[i]["pixel_values"]) for i in range(50))
    a[3]["pixel_values"].add_(1)  # a caller mutating its item must not corrupt the cache
    assert torch.equal(a[3]["pixel_values"], uncached[3]["pixel_values"])
    other = ShapesDataset(50, 32, seed=8)
    assert any(not torch.equal(a[i]["pixel_values"], other[i]["pixel_values"]) for i in range(10))


def test_items_have_the_model_layout_and_range():
    item = ShapesDataset(4, resolution=48)[0]
    x = item["pixel_values"]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(item["attributes"]) == {"shape", "color", "background", "size", "position"}
    batch = collate_examples([ShapesDataset(4, 48)[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 48, 48) and len(batch["captions"]) == 4


def test_vocabularies_meet_the_minimum():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLORS) >= 6 and len(POSITIONS) == 9 and len(SIZES) >= 3 and len(BACKGROUNDS) >= 6


def _named(caption: str, vocabulary) -> list[str]:
    """Vocabulary words in the caption, longest match first so "top left" is not also read as "top"."""
    found = []
    for word in sorted(vocabulary, key=len, reverse=True):
        pattern = rf"\b{re.escape(word)}\b"
        if re.search(pattern, caption):
            found.append(word)
            caption = re.sub(pattern, " ", caption)
    return found


def test_caption_names_exactly_the_attributes_and_phrasing_varies():
    ds = ShapesDataset(300, 32)
    phrasings = set()
    for i in range(len(ds)):
        item = ds[i]
        caption, attrs = item["caption"], item["attributes"]
        assert _named(caption, SHAPES) == [attrs["shape"]]
        assert sorted(_named(caption, COLORS)) == sorted({attrs["color"], attrs["background"]})
        assert _named(caption, SIZES) == [attrs["size"]]
        assert _named(caption, POSITIONS) == [attrs["position"]]
        assert attrs["color"] != attrs["background"]
        # The background is the one named next to "background", "on" or "image".
        assert re.search(rf"{attrs['background']} (background|image)|on {attrs['background']}", caption)
        phrasings.add(re.sub(r"\w+", "w", caption))
    assert len(phrasings) >= 4


def test_image_shows_the_attributes_of_its_caption():
    ds = ShapesDataset(200, 64)
    area = {size: [] for size in SIZES}
    for i in range(len(ds)):
        item = ds[i]
        attrs = item["attributes"]
        rgb = ((item["pixel_values"] + 1) * 127.5).round().permute(1, 2, 0).numpy()  # (H, W, 3)
        fg, bg = np.array(PALETTE[attrs["color"]]), np.array(PALETTE[attrs["background"]])
        assert np.abs(rgb[0, 0] - bg).max() <= 1  # a corner is background
        inside = np.abs(rgb - fg).max(axis=-1) <= 1
        ys, xs = np.nonzero(inside)
        assert len(xs) > 0
        cx, cy = POSITION_CENTER[attrs["position"]]
        # The shape's centroid is within the jitter (plus triangle offset) of its named grid position.
        assert abs(xs.mean() / 64 - cx) < 0.08 and abs(ys.mean() / 64 - cy) < 0.1
        area[attrs["size"]].append(len(xs))
    means = [np.mean(area[size]) for size in SIZES]
    assert means == sorted(means)  # small < medium < large on average


def test_every_item_hashes_to_its_own_split_whatever_the_seed():
    # image_split is a function of the pixels, so this is what rules out an image in both splits.
    for seed in (0, 1):
        for split in ("train", "heldout"):
            ds = ShapesDataset(200, 16, split=split, seed=seed)
            assert all(image_split(ds.draw(i)[1]) == split for i in range(len(ds)))
    # Roughly HELDOUT_PERCENT of random scenes belong to heldout.
    rng = np.random.default_rng(0)
    shares = [image_split(render_scene(sample_scene(rng), 32)) == "heldout" for _ in range(2000)]
    assert abs(np.mean(shares) - HELDOUT_PERCENT / 100) < 0.03


def test_train_and_heldout_images_never_coincide():
    def fingerprints(split, seed):
        ds = ShapesDataset(1500, 16, split=split, seed=seed)
        return {ds[i]["pixel_values"].numpy().tobytes() for i in range(len(ds))}

    # At 16 px many scenes rasterize alike; splitting on the pixels still keeps the splits apart.
    train = fingerprints("train", 0)
    heldout = fingerprints("heldout", 1)
    assert len(train) > 1000 and len(heldout) > 1000
    assert not train & heldout


def test_novel_combinations_occur_only_in_the_compositional_split():
    def triples(split, include_novel=False):
        ds = ShapesDataset(1200, 16, split=split, seed=3, include_novel=include_novel)
        return [combination(ds[i]["attributes"]) for i in range(len(ds))]

    assert not set(triples("train")) & NOVEL_COMBINATIONS
    assert not set(triples("heldout")) & NOVEL_COMBINATIONS
    compositional = triples("compositional")
    assert set(compositional) == NOVEL_COMBINATIONS  # 1200 draws cover all 12
    # The probe's training data keeps them (about 12 / 216 of the scenes).
    share = np.mean([t in NOVEL_COMBINATIONS for t in triples("train", include_novel=True)])
    assert 0.02 < share < 0.1
    # A compositional item's caption names its attributes like any other.
    item = ShapesDataset(3, 16, split="compositional")[0]
    assert all(value in item["caption"] for value in item["attributes"].values())


def test_only_the_triples_are_novel_every_attribute_and_pair_is_still_trained_on():
    trained = {(s, c, p) for s in SHAPES for c in COLORS for p in POSITIONS} - NOVEL_COMBINATIONS
    assert len(NOVEL_COMBINATIONS) == 12
    for first, second in ((0, 1), (0, 2), (1, 2)):
        pairs = {(t[first], t[second]) for t in trained}
        everything = {(t[first], t[second]) for t in (*trained, *NOVEL_COMBINATIONS)}
        assert pairs == everything
    for k, vocabulary in enumerate((SHAPES, COLORS, POSITIONS)):
        assert {t[k] for t in NOVEL_COMBINATIONS} <= set(vocabulary)
    assert {t[2] for t in NOVEL_COMBINATIONS} == set(POSITIONS)  # every position is tested


def test_edges_are_antialiased():
    scene = {
        "shape": "circle",
        "color": "red",
        "background": "blue",
        "size": "large",
        "position": "center",
        "jitter": (0, 0, 1.0),
    }
    rgb = np.asarray(render_scene(scene, 32), dtype=np.float64).reshape(-1, 3)
    fg, bg = np.array(PALETTE["red"], float), np.array(PALETTE["blue"], float)
    mixed = rgb[(np.abs(rgb - fg).max(1) > 2) & (np.abs(rgb - bg).max(1) > 2)]
    assert len(mixed) >= 10  # a ring of partially covered pixels
    # Each mixed pixel is alpha * fg + (1 - alpha) * bg with 0 < alpha < 1 (box filter = area coverage).
    alpha = (mixed - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
    assert ((alpha > 0) & (alpha < 1)).all()
    assert np.abs(bg + alpha[:, None] * (fg - bg) - mixed).max() <= 1.0


def test_a_cross_is_drawn_as_two_bars_with_the_area_of_a_circle():
    scene = {"color": "red", "background": "blue", "size": "large", "position": "center", "jitter": (0, 0, 1.0)}
    red = np.array(PALETTE["red"], float)

    def covered(shape: str) -> np.ndarray:  # the share of each pixel the shape covers
        rgb = np.asarray(render_scene(scene | {"shape": shape}, 64), dtype=np.float64)
        blue = np.array(PALETTE["blue"], float)
        return (rgb - blue) @ (red - blue) / ((red - blue) @ (red - blue))

    cross = covered("cross")
    assert cross[32, 32] > 0.99 and cross[32, 24] > 0.99 and cross[24, 32] > 0.99  # centre and both bars
    assert cross[24, 24] < 0.01 and cross[40, 40] < 0.01  # the corners between the arms are background
    assert abs(cross.sum() / covered("circle").sum() - 1) < 0.25
    assert not np.allclose(cross, covered("square"), atol=0.1)


def test_added_shapes_and_colours_are_drawn_and_the_default_sets_keep_their_items():
    default = ShapesDataset(40, 32, seed=3)
    explicit = ShapesDataset(40, 32, seed=3, shapes=SHAPES, colors=COLORS)
    assert all(torch.equal(default[i]["pixel_values"], explicit[i]["pixel_values"]) for i in range(40))
    assert default.content_version == "shapes/2"  # caches built before `shapes` and `colors` existed stay valid
    extended = ShapesDataset(450, 32, seed=3, shapes=(*SHAPES, "cross"), colors=(*COLORS, "pink"))
    items = [extended[i] for i in range(450)]
    crosses = [item for item in items if item["attributes"]["shape"] == "cross"]
    pinks = [item for item in items if item["attributes"]["color"] == "pink"]
    assert 80 <= len(crosses) <= 145  # a quarter of 450, give or take three binomial s.e.
    assert 25 <= len(pinks) <= 75  # a ninth of 450, likewise
    assert all(" cross" in item["caption"] for item in crosses) and all("pink" in item["caption"] for item in pinks)
    assert any(item["attributes"]["background"] == "pink" for item in items)
    pink = np.array(COLOR_RGB["pink"], dtype=np.float32) / 127.5 - 1
    for item in pinks[:5]:  # the shape's pixels are pink
        pixels = item["pixel_values"].permute(1, 2, 0).reshape(-1, 3).numpy()
        assert (np.abs(pixels - pink).max(1) < 1e-6).sum() >= 4
    assert extended.content_version != default.content_version


@pytest.mark.parametrize(
    ("kind", "chosen"),
    [
        ("shapes", ("circle", "hexagon")),
        ("shapes", ("circle",)),
        ("shapes", ("circle", "circle")),
        ("colors", ("red", "teal")),
    ],
)
def test_bad_shape_and_colour_sets_are_refused_by_name(kind, chosen):
    with pytest.raises(ValueError, match=kind):
        ShapesDataset(4, 32, **{kind: chosen})


@pytest.mark.parametrize("bad", [{"num_samples": 0}, {"resolution": 4}, {"split": "test"}])
def test_bad_arguments_name_the_argument(bad):
    kwargs = {"num_samples": 4, "resolution": 32, "split": "train", **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        ShapesDataset(**kwargs)
