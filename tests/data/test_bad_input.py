"""Bad input gets a clear answer: each broken file, odd image and bad metadata line is named, and lenient mode
keeps going where strict mode stops."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data import ImageFolderDataset, WebDatasetSource, collate_examples
from ldm.data.images import load_pixels

RES = 16


def _encoded(image, fmt, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(size, seed=0):
    """Noisy pixels, so encoded files are large enough that cutting them in half cuts into pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _folder(root, files, lines=None):
    """Write `files` (name -> bytes) and a metadata.jsonl listing them (or the given raw `lines`, as bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    if lines is None:
        lines = [json.dumps({"file_name": name, "text": f"caption of {name}"}).encode() for name in files]
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


GOOD = _encoded(Image.new("RGB", (20, 20), (10, 200, 30)), "PNG")
BIG = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")  # 4096 pixels: a "bomb" under a 1000-pixel limit

BAD_FILES = {
    "empty.png": (b"", "UnidentifiedImageError"),
    "truncated.jpg": (_encoded(_noise((64, 64)), "JPEG", quality=95)[:3000], "truncated"),
    "truncated.png": (_encoded(_noise((64, 64)), "PNG")[:4000], "truncated"),
    "random_bytes.jpg": (np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes(), "Unidentified"),
    "notes.png": (b"this is a text file with an image extension\n", "UnidentifiedImageError"),
    "document.jpg": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n", "UnidentifiedImageError"),
    "bomb.png": (BIG, "DecompressionBombError"),
}


def lower_pixel_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered to 1000 pixels: BIG (4096) is over twice the limit, 40x30 just over."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_image_is_skipped_by_name_or_fatal_when_strict(tmp_path, monkeypatch, caplog, name):
    data, reason = BAD_FILES[name]
    if name == "bomb.png":
        lower_pixel_limit(monkeypatch)
    root = _folder(tmp_path / "images", {"good.png": GOOD, name: data})
    bad = str(root / name)

    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        ds = ImageFolderDataset(root, RES)
    assert [p.name for p, _ in ds.records] == ["good.png"]  # the good image survives its broken neighbour
    skipped = dict(ds.summary().skipped)
    assert list(skipped) == [bad] and reason.lower() in skipped[bad].lower()
    assert f"skipped {bad}: " in caplog.text

    with pytest.raises(OSError, match=f"{name}: cannot load image") as info:
        ImageFolderDataset(root, RES, strict=True)
    assert reason.lower() in str(info.value).lower()

    # Found only while loading (no start-up check): the item is dropped from its batch, the run goes on.
    lazy = ImageFolderDataset(root, RES, verify=False)
    batch = collate_examples([lazy[0], lazy[1]])
    assert batch["captions"] == ["caption of good.png"] and batch["pixel_values"].shape == (1, 3, RES, RES)
    assert [path for path, _ in lazy.summary().runtime_skipped] == [bad]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, which names no file
def test_an_image_just_over_the_pixel_limit_loads_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    lower_pixel_limit(monkeypatch)
    root = _folder(tmp_path / "images", {"large.png": _encoded(Image.new("RGB", (40, 30), (255, 0, 0)), "PNG")})
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):
        ds = ImageFolderDataset(root, RES)
    assert len(ds) == 1 and ds.summary().clean
    assert f"{root / 'large.png'}: 40x30 = 1200 pixels is over the decompression-bomb limit of 1000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):  # bytes are named by their source
        load_pixels(_encoded(Image.new("RGB", (40, 30)), "PNG"), RES, name="shard-007.tar: 000123")
    assert "shard-007.tar: 000123: 40x30 = 1200 pixels" in caplog.text


def _mode_image(mode):
    """(an image of `mode`, its encoding, the RGB colour it must load as)."""
    if mode == "1":
        return Image.new("1", (20, 20), 1), "PNG", (255, 255, 255)
    if mode == "I;16 tiff":  # 16-bit grey: 65535 is white (PIL's own convert would clip every value over 255)
        return Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)), "TIFF", (255, 255, 255)
    if mode == "I;16 dark":
        return Image.fromarray(np.full((20, 20), 257 * 60, dtype=np.uint16)), "PNG", (60, 60, 60)
    if mode == "F":  # float grey is read as [0, 1]
        return Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32)), "TIFF", (128, 128, 128)
    if mode == "RGBA transparent":  # fully transparent pixels are white, whatever colour they hold
        return Image.new("RGBA", (20, 20), (0, 0, 255, 0)), "PNG", (255, 255, 255)
    if mode == "RGBA webp":
        return Image.new("RGBA", (20, 20), (0, 0, 255, 128)), "WEBP", (127, 127, 255)  # half-transparent blue
    if mode == "LA":
        return Image.new("LA", (20, 20), (40, 255)), "PNG", (40, 40, 40)
    if mode == "P":
        image = Image.new("P", (20, 20), 1)
        image.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
        return image, "GIF", (200, 100, 50)
    if mode == "CMYK":  # magenta ink only
        return Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "TIFF", (255, 0, 255)
    raise AssertionError(mode)


MODES = ["1", "I;16 tiff", "I;16 dark", "F", "RGBA transparent", "RGBA webp", "LA", "P", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_loads_as_rgb(mode):
    image, fmt, rgb = _mode_image(mode)
    lossless = {"lossless": True} if fmt == "WEBP" else {}
    pixels = load_pixels(_encoded(image, fmt, **lossless), RES)  # (3, RES, RES) in [-1, 1]
    assert pixels.shape == (3, RES, RES)
    got = ((pixels + 1) * 127.5).permute(1, 2, 0).reshape(-1, 3).numpy()
    np.testing.assert_allclose(got, np.broadcast_to(rgb, got.shape), atol=1.5)


# An upright square in four colours: red top-left, green top-right, blue bottom-left, white bottom-right.
QUADRANTS = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 255)}
# How each EXIF orientation is stored: the transform that turns the upright picture into the stored pixels
# (the inverse of what a viewer applies). 6 = "rotate 90 degrees clockwise to view", so it is stored turned
# 90 degrees counter-clockwise (PIL's ROTATE_90).
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_is_applied(orientation):
    upright = Image.new("RGB", (32, 32))
    for (row, col), colour in QUADRANTS.items():
        upright.paste(colour, (16 * col, 16 * row, 16 * col + 16, 16 * row + 16))
    stored = upright if STORED_AS[orientation] is None else upright.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = load_pixels(_encoded(stored, "PNG", exif=exif.tobytes()), RES)
    rgb = ((pixels + 1) * 127.5).permute(1, 2, 0).numpy()  # (H, W, 3)
    for (row, col), colour in QUADRANTS.items():
        centre = rgb[RES // 4 + row * RES // 2, RES // 4 + col * RES // 2]
        np.testing.assert_allclose(centre, colour, atol=2, err_msg=f"orientation {orientation}, quadrant {row, col}")


BAD_LINES = {
    "invalid JSON": (b'{"file_name": "good.png", "text": ', "invalid JSON"),
    "not an object": (b'["good.png", "a caption"]', "expected a JSON object, got list"),
    "no file_name": (b'{"text": "a caption"}', "missing or empty 'file_name'"),
    "empty file_name": (b'{"file_name": " ", "text": "a caption"}', "missing or empty 'file_name'"),
    "caption of the wrong type": (b'{"file_name": "good.png", "text": 42}', "'text' must be a string"),
    "parent folder": (b'{"file_name": "../outside.png", "text": "x"}', "must be a path inside the folder"),
    "absolute path": (b'{"file_name": "/etc/hostname", "text": "x"}', "must be a path inside the folder"),
    "not UTF-8": ('{"file_name": "good.png", "text": "café"}'.encode("latin-1"), "byte 0xe9 at position"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_a_bad_metadata_line_is_named_by_file_and_line(tmp_path, caplog, kind):
    line, problem = BAD_LINES[kind]
    good = json.dumps({"file_name": "good.png", "text": "green"}).encode()
    root = _folder(tmp_path / "images", {"good.png": GOOD}, lines=[good, line])
    where = f"{root / 'metadata.jsonl'}:2: "
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        ds = ImageFolderDataset(root, RES)
    assert [n for n, _ in ds.summary().bad_lines] == [2] and problem in ds.summary().bad_lines[0][1]
    assert where in caplog.text and problem in caplog.text
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: ") as info:
        ImageFolderDataset(root, RES, strict=True)
    assert str(root) in str(info.value) and problem in str(info.value)


def test_a_caption_that_is_not_utf8_is_kept_with_replacement_characters(tmp_path):
    root = _folder(
        tmp_path / "images",
        {"good.png": GOOD},
        lines=['\ufeff{"file_name": "good.png", "text": "café"}'.encode("latin-1", errors="ignore")],
    )
    ds = ImageFolderDataset(root, RES)
    assert len(ds) == 1 and ds[0]["caption"] == "caf\ufffd"  # the image is not lost over one accent


def test_a_utf8_file_with_a_byte_order_mark_is_clean(tmp_path):
    line = json.dumps({"file_name": "good.png", "text": "café"}, ensure_ascii=False)
    root = _folder(tmp_path / "images", {"good.png": GOOD}, lines=[("\ufeff" + line).encode("utf-8")])
    ds = ImageFolderDataset(root, RES)
    assert ds.summary().clean and ds[0]["caption"] == "café"


def test_webdataset_caption_that_is_not_utf8_is_named(tmp_path, caplog):
    path = tmp_path / "shard.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "latin1", "png": GOOD, "txt": "café".encode("latin-1")})
    with caplog.at_level(logging.WARNING, logger="ldm.data.webdataset_source"):
        items = list(WebDatasetSource(str(path), RES))
    assert [item["caption"] for item in items] == ["caf\ufffd"]
    assert f"{path}: latin1: caption 'txt' is not UTF-8 text (byte 0xe9 at position 4" in caplog.text
    with pytest.raises(ValueError, match=r"shard\.tar: latin1: caption 'txt' is not UTF-8"):
        list(WebDatasetSource(str(path), RES, strict=True))


def test_webdataset_truncated_shard_is_named_and_earlier_samples_kept(tmp_path, caplog):
    path = tmp_path / "cut.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:03d}", "png": GOOD, "txt": f"sample {i}"})
    # Each sample is two 512-byte headers and two 512-byte blocks of data: cut in the data of sample 2's image.
    path.write_bytes(path.read_bytes()[: 2 * 2048 + 512 + 40])
    with caplog.at_level(logging.WARNING, logger="ldm.data.webdataset_source"):
        captions = [item["caption"] for item in WebDatasetSource(str(path), RES)]
    assert captions[:1] == ["sample 0"]  # what was read before the cut is kept
    assert "skipping unreadable data: ReadError" in caplog.text and str(path) in caplog.text
    with pytest.raises(tarfile.ReadError) as info:
        list(WebDatasetSource(str(path), RES, strict=True))
    assert str(path) in str(info.value)
