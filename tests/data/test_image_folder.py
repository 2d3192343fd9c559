"""The image-folder source on a messy folder: every image mode, EXIF rotation, broken files, bad metadata."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import DataConfig, ImageFolderDataset, build_dataset, collate_examples

RES = 16


def _noise(size, seed=0):
    """A noisy RGB image, so that JPEG/PNG data cannot be tiny and truncation cuts into pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _halves(size, first, second, vertical_split=True):
    """An RGB image whose left (or top) half is `first` and other half `second`."""
    w, h = size
    img = Image.new("RGB", size, second)
    img.paste(first, (0, 0, w // 2, h) if vertical_split else (0, 0, w, h // 2))
    return img


def _write_jsonl(root, lines):
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def messy_folder(tmp_path):
    """A folder with 9 good images of assorted modes and 4 broken files, plus a listed file that does not exist."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _noise((40, 30)).save(root / "rgb.jpg", quality=95)
    Image.new("L", (20, 20), 100).save(root / "grey.png")
    la = Image.new("LA", (32, 32), (0, 0))  # transparent black ...
    la.paste((0, 255), (0, 0, 16, 32))  # ... with an opaque black left half
    la.save(root / "grey_alpha.png")
    _noise((24, 24)).quantize(16).save(root / "sub" / "palette.png")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    pal.save(root / "palette_transparent.png", transparency=0)  # index 0 (green) is transparent
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(root / "rgba.png")  # half-transparent red
    Image.new("CMYK", (20, 20), (255, 0, 0, 0)).save(root / "cmyk.jpg", quality=95)  # pure cyan
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "deep.png")  # 16-bit grey
    # Stored landscape, left half red / right half blue; EXIF orientation 6 says "rotate 90 degrees clockwise".
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves((64, 32), (255, 0, 0), (0, 0, 255)).save(root / "rotated.jpg", quality=95, exif=exif.tobytes())
    # Broken files.
    (root / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    _noise((64, 64), seed=1).save(good, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    good = io.BytesIO()
    _noise((64, 64), seed=2).save(good, "PNG")
    (root / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "garbage.jpg").write_bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    _write_jsonl(
        root,
        [
            json.dumps({"file_name": "rgb.jpg", "text": "noise"}),
            json.dumps({"file_name": "grey.png", "text": "a grey square"}),
            json.dumps({"file_name": "grey_alpha.png", "text": "   "}),  # blank caption
            json.dumps({"file_name": "sub/palette.png", "text": "palette"}),
            json.dumps({"file_name": "palette_transparent.png", "text": None}),  # null caption
            json.dumps({"file_name": "rgba.png", "text": "pink"}),
            json.dumps({"file_name": "cmyk.jpg", "text": "cyan"}),
            json.dumps({"file_name": "deep.png"}),  # no caption key
            json.dumps({"file_name": "rotated.jpg", "text": "red above blue"}),
            json.dumps({"file_name": "empty.png", "text": "zero bytes"}),
            json.dumps({"file_name": "truncated.jpg", "text": "half a jpeg"}),
            "",
            json.dumps({"file_name": "truncated.png", "text": "half a png"}),
            json.dumps({"file_name": "garbage.jpg", "text": "random bytes"}),
            json.dumps({"file_name": "not_there.png", "text": "missing"}),
            '{"file_name": "rgb.jpg", "text": ',  # line 16: invalid JSON
            json.dumps({"text": "no file"}),  # line 17: no file_name
        ],
    )
    return root


def _by_name(ds):
    return {path.name: ds[i] for i, (path, _) in enumerate(ds.records)}


def test_messy_folder_keeps_good_images_and_reports_the_rest(messy_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        ds = ImageFolderDataset(messy_folder, RES)
    items = _by_name(ds)
    assert set(items) == {
        "rgb.jpg",
        "grey.png",
        "grey_alpha.png",
        "palette.png",
        "palette_transparent.png",
        "rgba.png",
        "cmyk.jpg",
        "deep.png",
        "rotated.jpg",
    }
    for item in items.values():
        x = item["pixel_values"]
        assert x.shape == (3, RES, RES) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0

    summary = ds.summary()
    assert summary.rows == 14 and summary.kept == 9
    reasons = dict(summary.skipped)
    assert set(reasons) == {
        str(messy_folder / name)
        for name in ("empty.png", "truncated.jpg", "truncated.png", "garbage.jpg", "not_there.png")
    }
    assert "UnidentifiedImageError" in reasons[str(messy_folder / "empty.png")]
    assert "truncated" in reasons[str(messy_folder / "truncated.jpg")].lower()
    assert "truncated" in reasons[str(messy_folder / "truncated.png")].lower()
    assert reasons[str(messy_folder / "not_there.png")] == "file not found"
    assert [line for line, _ in summary.bad_lines] == [16, 17]
    assert summary.missing_captions == 3

    captions = {name: item["caption"] for name, item in items.items()}
    assert captions["rgb.jpg"] == "noise"
    assert captions["grey_alpha.png"] == captions["palette_transparent.png"] == captions["deep.png"] == ""

    # Everything is reported by file and line / path in the log.
    log = caplog.text
    assert "metadata.jsonl:16: invalid JSON" in log and "metadata.jsonl:17: missing or empty 'file_name'" in log
    assert "truncated.jpg" in log and "kept 9 of 14 images" in log
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        ds.log_summary()  # what a trainer calls at the end of an epoch
    assert "empty.png: UnidentifiedImageError" in caplog.text


def test_modes_are_converted_to_the_right_colours(messy_folder):
    items = _by_name(ImageFolderDataset(messy_folder, RES))

    def rgb(name):  # back to 0..255 for readable comparisons, (H, W, 3)
        return ((items[name]["pixel_values"] + 1) * 127.5).permute(1, 2, 0).numpy()

    assert np.allclose(rgb("grey.png"), 100, atol=1)
    la = rgb("grey_alpha.png")
    assert np.allclose(la[:, :6], 0, atol=1) and np.allclose(la[:, -6:], 255, atol=1)  # transparent -> white
    assert np.allclose(rgb("palette_transparent.png"), 255, atol=1)  # the transparent index is white, not green
    assert np.allclose(rgb("rgba.png"), [255, 127, 127], atol=2)  # 50 % red over white
    assert np.allclose(rgb("cmyk.jpg"), [0, 255, 255], atol=6)  # cyan
    # 16-bit grey is rescaled (40000 / 65535 * 255 = 155.6), where PIL's own convert would clip it to 255.
    assert np.allclose(rgb("deep.png"), 156, atol=1)
    assert np.asarray(Image.open(messy_folder / "deep.png").convert("L")).max() == 255


def test_exif_orientation_is_applied(messy_folder):
    rotated = ((_by_name(ImageFolderDataset(messy_folder, RES))["rotated.jpg"]["pixel_values"] + 1) * 127.5).numpy()
    red, blue = rotated[0], rotated[2]  # (H, W) each
    # Stored as red-left / blue-right; turned 90 degrees clockwise the red half is on top.
    assert (red[:4] > 200).all() and (blue[:4] < 60).all()
    assert (blue[-4:] > 200).all() and (red[-4:] < 60).all()
    # Without the EXIF tag applied, the same file would be read red-left.
    raw = np.asarray(Image.open(messy_folder / "rotated.jpg").convert("RGB"))
    assert raw.shape == (32, 64, 3) and raw[:, :8, 0].min() > 200


def test_strict_mode_names_the_bad_file_or_line(messy_folder):
    with pytest.raises(ValueError, match=r"metadata\.jsonl:16: invalid JSON"):
        ImageFolderDataset(messy_folder, RES, strict=True)
    lines = (messy_folder / "metadata.jsonl").read_text().splitlines()
    _write_jsonl(messy_folder, lines[:10])  # valid lines only; the 10th names empty.png
    with pytest.raises(OSError, match=r"empty\.png: cannot load image \(UnidentifiedImageError"):
        ImageFolderDataset(messy_folder, RES, strict=True)
    _write_jsonl(messy_folder, lines[:9])
    assert len(ImageFolderDataset(messy_folder, RES, strict=True)) == 9


def test_failures_at_load_time_become_none_and_are_dropped_by_collate(messy_folder, caplog):
    ds = ImageFolderDataset(messy_folder, RES, verify=False)  # no start-up decoding: only missing files are known
    assert len(ds) == 13 and len(ds.summary().skipped) == 1
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_examples)
        batches = list(loader)
    assert [len(b["captions"]) for b in batches] == [5, 4, 0]  # the last batch held only broken files
    assert all(b["pixel_values"].shape == (len(b["captions"]), 3, RES, RES) for b in batches[:2])
    assert batches[2]["pixel_values"].shape[0] == 0
    assert len(ds.summary().runtime_skipped) == 4 and "skipping" in caplog.text and "garbage.jpg" in caplog.text
    ds.strict = True  # the same failure at load time, strictly: an error naming the file
    index = [p.name for p, _ in ds.records].index("garbage.jpg")
    with pytest.raises(OSError, match=r"garbage\.jpg: cannot load image"):
        ds[index]


def test_flip_is_off_by_default_and_random_when_on(tmp_path):
    _halves((32, 32), (255, 0, 0), (0, 0, 255)).save(tmp_path / "a.png")
    _write_jsonl(tmp_path, [json.dumps({"file_name": "a.png", "text": "red left"})])
    plain = ImageFolderDataset(tmp_path, RES)
    assert all(plain[0]["pixel_values"][0, :, 0].min() > 0.9 for _ in range(10))  # red stays left
    torch.manual_seed(0)
    flipping = ImageFolderDataset(tmp_path, RES, random_flip=True)
    left_red = [bool(flipping[0]["pixel_values"][0, :, 0].min() > 0.9) for _ in range(40)]
    assert 5 < sum(left_red) < 35


def test_short_side_resize_and_crop(tmp_path):
    _halves((64, 32), (255, 0, 0), (0, 0, 255)).save(tmp_path / "wide.png")  # 2:1, red left half
    _write_jsonl(tmp_path, [json.dumps({"file_name": "wide.png", "text": ["one", "two"]})])
    center = ImageFolderDataset(tmp_path, RES)[0]["pixel_values"]
    # Short side 32 -> 16, so 32 x 16 resized, centre 16 columns: half red, half blue.
    assert center[0, :, :6].min() > 0.9 and center[2, :, -6:].min() > 0.9
    torch.manual_seed(0)
    ds = ImageFolderDataset(tmp_path, RES, center_crop=False)
    crops = {ds[0]["pixel_values"].numpy().tobytes() for _ in range(20)}
    assert len(crops) > 3
    assert {ds[0]["caption"] for _ in range(30)} == {"one", "two"}  # a list of captions: one at random


def test_folder_without_metadata_uses_every_image_unconditionally(tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, RES)
    assert len(ds) == 1 and ds[0]["caption"] == "" and ds.summary().missing_captions == 1
    assert not ds.has_captions


def test_strict_mode_needs_the_metadata_file(tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl: not found \(strict mode\).*data\.strict: false"):
        ImageFolderDataset(tmp_path, RES, strict=True)


def test_build_dataset_reads_folders_and_names_missing_keys(messy_folder):
    cfg = DataConfig(source="imagefolder", resolution=RES, train_path=str(messy_folder), random_flip=True)
    assert len(build_dataset(cfg, "train")) == 9
    with pytest.raises(ValueError, match="heldout_path"):
        build_dataset(cfg, "heldout")
    with pytest.raises(ValueError, match="train_path"):
        DataConfig(source="imagefolder")
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="folder")
