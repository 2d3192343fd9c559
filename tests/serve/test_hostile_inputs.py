"""Hostile uploads and oversized requests: every bad image is a 422 naming `image` (never a 500, never decoded past
its header), valid images of every accepted kind still work, and a request's work is capped.

The hostile files are built here byte by byte (PNG chunks with their CRCs, zlib streams, JPEG scans).
"""

from __future__ import annotations

import base64
import io
import random
import struct
import tracemalloc
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from ldm.serve import ServeLimits, create_app, serve_in_background
from tests.pipeline.tiny_models import tiny_pipeline

PROMPT = "a red circle on a white background"
SIDE = 16  # the tiny pipeline's images
SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
BOMB_MIB = 200  # what each text-chunk bomb inflates to


# ---- building files ------------------------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def ihdr(width: int = SIDE, height: int = SIDE, depth: int = 8, colour_type: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace))


def png(*chunks: bytes) -> bytes:
    return SIGNATURE + b"".join(chunks) + chunk(b"IEND", b"")


def rows(pixel: bytes, width: int = SIDE, height: int = SIDE) -> bytes:
    """Unfiltered scanlines (filter byte 0) of one repeated pixel."""
    return (b"\0" + pixel * width) * height


def noisy_rows() -> bytes:
    """RGB scanlines that do not compress, so cutting the file cuts pixels."""
    rng = np.random.default_rng(0)
    return b"".join(b"\0" + rng.integers(0, 256, 3 * SIDE, dtype=np.uint8).tobytes() for _ in range(SIDE))


def idat(scanlines: bytes) -> bytes:
    return chunk(b"IDAT", zlib.compress(scanlines))


def zeros_inflating_to(mib: int) -> bytes:
    """A zlib stream of `mib` MiB of zeros (about 1/1000 of that compressed), built without holding it."""
    compressor, block = zlib.compressobj(9), bytes(2**20)
    return b"".join(compressor.compress(block) for _ in range(mib)) + compressor.flush()


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def adam7_png(width: int, height: int, pixel: bytes) -> bytes:
    """An interlaced RGB PNG of one colour: each Adam7 pass's sub-image as its own scanlines."""
    passes = b""
    for x0, y0, dx, dy in ADAM7:
        pass_width, pass_height = len(range(x0, width, dx)), len(range(y0, height, dy))
        if pass_width and pass_height:
            passes += rows(pixel, pass_width, pass_height)
    return png(ihdr(width, height, interlace=1), idat(passes))


def jpeg_of_many_scans(repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each repeat is a pass over the whole image."""
    raw = saved(Image.new("RGB", (SIDE, SIDE), "red"), "JPEG", progressive=True)
    last_scan = raw.rindex(b"\xff\xda")
    return raw[:-2] + raw[last_scan:-2] * repeats + raw[-2:]


def apng() -> bytes:
    frames = [Image.new("RGB", (SIDE, SIDE), colour) for colour in ("red", "blue")]
    return saved(frames[0], "PNG", save_all=True, append_images=frames[1:])


def animated_gif() -> bytes:
    frames = [Image.new("P", (SIDE, SIDE), i) for i in (1, 2)]
    return saved(frames[0], "GIF", save_all=True, append_images=frames[1:])


BOMB = zeros_inflating_to(BOMB_MIB)
RED = b"\xff\x00\x00"
TWO_COLOURS = chunk(b"PLTE", RED + b"\x00\x00\xff")
NOISY = png(ihdr(), idat(noisy_rows()))
COMPRESSED_NOISE = zlib.compress(noisy_rows())

# id -> (file, error code, words the message must hold)
REFUSED = {
    "truncated_mid_idat": (NOISY[: len(NOISY) // 2], "invalid_value", "truncated PNG"),
    "zlib_stream_cut_in_whole_chunks": (
        png(ihdr(), chunk(b"IDAT", COMPRESSED_NOISE[: len(COMPRESSED_NOISE) // 2])),
        "invalid_value",
        "truncated PNG",
    ),
    "idat_short_of_rows": (png(ihdr(), idat(rows(RED, height=SIDE // 2))), "invalid_value", "truncated PNG"),
    "idat_bad_checksum": (png(ihdr(), chunk(b"IDAT", zlib.compress(rows(RED)), crc=1)), "invalid_value", "checksum"),
    "first_chunk_not_ihdr": (png(chunk(b"tEXt", b"a\0b"), ihdr(), idat(rows(RED))), "invalid_value", "IHDR"),
    "palette_index_past_palette": (
        png(ihdr(colour_type=3), TWO_COLOURS, idat(rows(b"\xc8"))),
        "invalid_value",
        "palette index 200",
    ),
    "palette_without_plte": (png(ihdr(colour_type=3), idat(rows(b"\x00"))), "invalid_value", "without a PLTE"),
    "trns_longer_than_palette": (
        png(ihdr(colour_type=3), TWO_COLOURS, chunk(b"tRNS", b"\x80" * 200), idat(rows(b"\x01"))),
        "invalid_value",
        "200 tRNS entries for a palette of 2",
    ),
    "huge_header_tiny_body": (png(ihdr(100_000, 100_000), idat(rows(RED))), "out_of_range", "100000x100000"),
    "undefined_bit_depth": (png(ihdr(depth=3), idat(rows(RED))), "invalid_value", "bit depth 3"),
    "16_bit_greyscale": (png(ihdr(depth=16, colour_type=0), idat(rows(b"\x80\x00"))), "invalid_value", "I;16"),
    "cmyk_jpeg": (saved(Image.new("CMYK", (SIDE, SIDE)), "JPEG"), "invalid_value", "CMYK"),
    "jpeg_of_many_scans": (jpeg_of_many_scans(150), "invalid_value", "scans"),
    "jpeg_truncated": (saved(Image.new("RGB", (SIDE, SIDE), "red"), "JPEG")[:200], "invalid_value", "broken JPEG"),
    "apng": (apng(), "invalid_value", "animated PNG (2 frames)"),
    "animated_gif": (animated_gif(), "invalid_value", "GIF format"),
    "gif": (saved(Image.new("RGB", (SIDE, SIDE)), "GIF"), "invalid_value", "GIF format"),
    "webp": (saved(Image.new("RGB", (SIDE, SIDE)), "WEBP"), "invalid_value", "WebP format"),
    "bmp": (saved(Image.new("RGB", (SIDE, SIDE)), "BMP"), "invalid_value", "BMP format"),
    "tiff": (saved(Image.new("RGB", (SIDE, SIDE)), "TIFF"), "invalid_value", "TIFF format"),
    "not_an_image": (b"hello, world", "invalid_value", "not an image file"),
}
REFUSED_TEXT = {  # the image field as sent, when it is not base64 of a file
    "not_base64": ("not base64!", "invalid_value", "not base64"),
    "data_url_not_base64": ("data:image/png,iVBORw0KGgo=", "invalid_value", "data: URL must be base64"),
    "empty": ("", "invalid_value", "empty"),
}
# Valid images whose text or ICC chunks inflate without end: those chunks are dropped unread.
BOMBS = {
    "ztxt_bomb": png(ihdr(), chunk(b"zTXt", b"comment\0\0" + BOMB), idat(rows(RED))),
    "itxt_bomb": png(ihdr(), chunk(b"iTXt", b"comment\0\1\0\0\0" + BOMB), idat(rows(RED))),
    "iccp_bomb": png(ihdr(), chunk(b"iCCP", b"profile\0\0" + BOMB), idat(rows(RED))),
    "ztxt_bomb_after_idat": png(ihdr(), idat(rows(RED)), chunk(b"zTXt", b"comment\0\0" + BOMB)),
}
PHOTO = np.random.default_rng(1).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
ACCEPTED = {  # id -> (file, the RGB pixels it must decode to)
    "rgb_png": (saved(Image.fromarray(PHOTO), "PNG"), PHOTO),
    "rgba_png": (saved(Image.fromarray(PHOTO).convert("RGBA"), "PNG"), PHOTO),
    "greyscale_png": (
        saved(Image.fromarray(PHOTO).convert("L"), "PNG"),
        np.asarray(Image.fromarray(PHOTO).convert("L").convert("RGB")),
    ),
    "palette_png": (
        png(ihdr(colour_type=3), TWO_COLOURS, chunk(b"tRNS", b"\xff\x80"), idat(rows(b"\x01"))),
        np.broadcast_to(np.array([0, 0, 255], np.uint8), (SIDE, SIDE, 3)),
    ),
    "jpeg": (saved(Image.new("RGB", (SIDE, SIDE), "red"), "JPEG", quality=100), None),  # lossy: size checked
}
MORE_ACCEPTED = {  # checked without the server
    "one_bit_png": (png(ihdr(depth=1, colour_type=0), idat(rows(b"\xff", width=2))), np.full((SIDE, SIDE, 3), 255)),
    "greyscale_alpha_png": (saved(Image.new("LA", (SIDE, SIDE), (7, 100)), "PNG"), np.full((SIDE, SIDE, 3), 7)),
    "interlaced_png": (
        adam7_png(SIDE, SIDE, b"\x40\x50\x60"),
        np.broadcast_to(np.array([64, 80, 96]), (SIDE, SIDE, 3)),
    ),
    "progressive_jpeg": (
        saved(Image.new("L", (SIDE, SIDE), 255), "JPEG", progressive=True),
        np.full((SIDE, SIDE, 3), 255),
    ),
    **{name: (raw, np.broadcast_to(np.array([255, 0, 0]), (SIDE, SIDE, 3))) for name, raw in BOMBS.items()},
}


# ---- servers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=120) as client:
        yield client


# A work cap of max_batch x 16^2 x max_steps = 2048 pixel-steps, and sides up to PIL's bomb limit and past it.
SMALL_WORK = ServeLimits(max_batch=1, max_steps=8, max_side=20_000)
SMALL_WORK_CAP = 1 * SIDE**2 * 8


@pytest.fixture(scope="module")
def small_work() -> Iterator[httpx.Client]:
    with (
        serve_in_background(create_app(tiny_pipeline(), SMALL_WORK)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


def img2img(image: str, **settings) -> dict:
    return {"prompt": PROMPT, "image": image, "strength": 0.5, "num_inference_steps": 4, **settings}


def assert_refused(answer: httpx.Response, code: str, words: str, field: str | None = "image") -> str:
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert words in error["message"], error["message"]
    return error["message"]


# ---- hostile images over HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_hostile_file_is_refused_naming_the_image_and_what_is_wrong(client, name):
    raw, code, words = REFUSED[name]
    assert_refused(client.post("/v1/generate", json=img2img(b64(raw))), code, words)


@pytest.mark.parametrize("name", list(REFUSED_TEXT))
def test_an_image_field_that_is_not_base64_of_a_file_is_refused(client, name):
    text, code, words = REFUSED_TEXT[name]
    assert_refused(client.post("/v1/generate", json=img2img(text)), code, words)


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_png_with_a_text_chunk_bomb_is_drawn_from_its_pixels(client, name):
    answer = client.post("/v1/generate", json=img2img(b64(BOMBS[name])))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["settings"]["height"], answer.json()["settings"]["width"]) == (SIDE, SIDE)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_valid_pngs_and_jpegs_are_still_drawn_from(client, name):
    raw, _ = ACCEPTED[name]
    answer = client.post("/v1/generate", json=img2img(b64(raw)))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["settings"]["height"], answer.json()["settings"]["width"]) == (SIDE, SIDE)


def test_sides_within_the_limit_but_pixels_past_pils_bomb_limit_are_refused_from_the_header(small_work):
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 8  # a greyscale header over the limit, with a body of 16x16
    raw = png(ihdr(side, side, colour_type=0), idat(rows(b"\x00")))
    message = assert_refused(small_work.post("/v1/generate", json=img2img(b64(raw))), "out_of_range", "pixels")
    assert f"{side}x{side}" in message


# ---- the work cap -------------------------------------------------------------------------------------------


def test_a_request_over_the_work_cap_is_refused_with_its_numbers(small_work):
    body = {"prompt": PROMPT, "num_images_per_prompt": 2, "num_inference_steps": 5}
    message = assert_refused(small_work.post("/v1/generate", json=body), "too_much_work", "--max-work", field=None)
    assert "2 images x 5 steps x 16x16 pixels = 2560 pixel-steps" in message
    assert f"cap is {SMALL_WORK_CAP}" in message and "fewer images, steps or pixels" in message


def test_a_request_at_the_work_cap_is_served(small_work):
    body = {"prompt": PROMPT, "num_images_per_prompt": 2, "num_inference_steps": 4}  # 2 x 4 x 256 = the cap
    answer = small_work.post("/v1/generate", json=body)
    assert answer.status_code == 200, answer.text


def test_image_to_image_counts_the_steps_it_runs(small_work):
    image = b64(saved(Image.fromarray(PHOTO), "PNG"))
    half = img2img(image, num_images_per_prompt=2, num_inference_steps=8, strength=0.5)  # 4 of 8 steps: the cap
    assert small_work.post("/v1/generate", json=half).status_code == 200
    more = img2img(image, num_images_per_prompt=2, num_inference_steps=8, strength=0.75)  # 6 of 8 steps
    answer = small_work.post("/v1/generate", json=more)
    assert "2 images x 6 steps (of 8, strength 0.75) x 16x16 pixels = 3072" in assert_refused(
        answer, "too_much_work", "--max-work", field=None
    )


def test_max_work_replaces_the_default_cap(tiny_app):
    from ldm.serve.errors import RequestError
    from ldm.serve.requests import resolve_request
    from ldm.serve.schema import GenerateRequest

    pipe, limits = tiny_app.state.queue.pipe, ServeLimits(max_work=SIDE**2 * 10)
    request = GenerateRequest(prompt=PROMPT, num_inference_steps=10)
    assert resolve_request(request, pipe, limits).steps_run == 10
    with pytest.raises(RequestError) as refused:
        resolve_request(GenerateRequest(prompt=PROMPT, num_inference_steps=11), pipe, limits)
    assert refused.value.code == "too_much_work" and "cap is 2560 (--max-work)" in refused.value.message


# ---- decode_image without a server -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ACCEPTED) + list(MORE_ACCEPTED))
def test_an_accepted_image_decodes_to_its_pixels(name):
    from ldm.serve.images import decode_image

    raw, expected = {**ACCEPTED, **MORE_ACCEPTED}[name]
    pixels = decode_image(b64(raw), side_limit=64)
    assert pixels.shape == (1, 3, SIDE, SIDE) and pixels.dtype.is_floating_point
    if expected is not None:
        got = (pixels[0].permute(1, 2, 0).numpy() * 255).round()
        np.testing.assert_array_equal(got, expected)


def test_an_interlaced_png_of_odd_sides_decodes():
    from ldm.serve.images import decode_image

    pixels = decode_image(b64(adam7_png(13, 7, b"\x10\x20\x30")), side_limit=64)
    assert pixels.shape == (1, 3, 7, 13)
    np.testing.assert_array_equal((pixels[0, :, 3, 5] * 255).round().tolist(), [16, 32, 48])


def test_a_data_url_decodes():
    from ldm.serve.images import decode_image

    raw, expected = ACCEPTED["rgb_png"]
    pixels = decode_image("data:image/png;base64," + b64(raw), side_limit=64)
    np.testing.assert_array_equal((pixels[0].permute(1, 2, 0).numpy() * 255).round(), expected)


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_text_chunk_bomb_is_never_inflated(name):
    from ldm.serve.images import decode_image

    data = b64(BOMBS[name])
    tracemalloc.start()
    try:
        decode_image(data, side_limit=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"{peak / 2**20:.1f} MiB to decode a {len(data) / 2**20:.2f} MiB upload"


@pytest.mark.parametrize("side_limit", [64, 20_000])
def test_a_huge_header_is_refused_before_pil_opens_the_file(side_limit, monkeypatch):
    """Sides past the limit, or (with a generous limit) pixels past PIL's decompression bomb limit."""
    from ldm.serve.errors import RequestError
    from ldm.serve.images import decode_image

    def never(*args, **kwargs):
        raise AssertionError("PIL opened the file")

    monkeypatch.setattr(Image, "open", never)
    side = 100_000 if side_limit == 64 else int(Image.MAX_IMAGE_PIXELS**0.5) + 8
    with pytest.raises(RequestError) as refused:
        decode_image(b64(png(ihdr(side, side, colour_type=0), idat(rows(b"\x00")))), side_limit=side_limit)
    assert refused.value.code == "out_of_range" and f"{side}x{side}" in refused.value.message


def test_pils_global_settings_are_left_as_they_are():
    """The text limits stay PIL's (our settings reader, png.py, reads text chunks of our own PNGs), and
    truncated files stay errors."""
    from ldm.serve.images import decode_image
    from ldm.serve.png import png_with_settings, read_generation_settings

    def settings() -> tuple:
        return PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY, ImageFile.LOAD_TRUNCATED_IMAGES

    before = settings()
    ours = png_with_settings(Image.fromarray(PHOTO), {"seed": 3}, "tiny")
    decode_image(b64(ours), side_limit=64)
    for raw in BOMBS.values():
        decode_image(b64(raw), side_limit=64)
    assert settings() == before
    assert before[2] is False and read_generation_settings(ours) == {"seed": 3}


def mutations(seed: int, count: int) -> Iterator[bytes]:
    """Valid PNGs and JPEGs with random bytes changed, cut out, inserted, or the file cut short."""
    r, photo = random.Random(seed), Image.fromarray(PHOTO)
    files = [saved(photo.convert(mode), "PNG") for mode in ("RGB", "RGBA", "L", "P", "1")]
    files += [saved(photo, "JPEG"), saved(photo, "JPEG", progressive=True), NOISY, adam7_png(SIDE, SIDE, RED)]
    for _ in range(count):
        raw = bytearray(r.choice(files))
        for _ in range(r.randint(1, 4)):
            at = r.randrange(len(raw))
            edit = r.random()
            if edit < 0.5:
                raw[at] = r.randrange(256)
            elif edit < 0.7:
                del raw[at : at + r.randint(1, 20)]
            elif edit < 0.85:
                raw[at:at] = r.randbytes(r.randint(1, 8))
            else:
                del raw[max(at, 1) :]
        yield bytes(raw)


def test_a_damaged_file_is_decoded_or_refused_never_an_error():
    from ldm.serve.errors import RequestError
    from ldm.serve.images import decode_image

    refused = 0
    for raw in mutations(seed=0, count=400):
        try:
            pixels = decode_image(b64(raw), side_limit=64)
        except RequestError as err:
            assert (err.status, err.field) == (422, "image") and err.message.startswith("image: ")
            refused += 1
        else:
            assert pixels.ndim == 4 and 0 <= pixels.min() <= pixels.max() <= 1
    assert refused > 200  # most damage is found
