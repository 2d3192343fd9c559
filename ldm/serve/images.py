"""An uploaded image (base64 PNG or JPEG, untrusted) as a pixel tensor, or a 422 that says what is wrong with it.

Hostile files are stopped before PIL decodes a pixel. The format is read from the first bytes (PNG or JPEG only).
A PNG's chunks are walked here and checked (order, CRCs, size, palette, animation, the length of its pixel data),
and PIL is handed a PNG rebuilt from the chunks that make pixels: text and ICC chunks, where decompression bombs
live, are never inflated, whatever PIL's text limits are set to. A JPEG's size is read from its header and its
scans are counted. Whatever PIL still finds wrong while decoding is caught as the image's fault.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from ldm.generation.inputs import image_batch
from ldm.serve.errors import RequestError, out_of_range

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_START = b"\xff\xd8\xff"
OTHER_FORMATS = {  # first bytes -> name, to say what was sent instead
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
    b"%PDF": "PDF",
    b"8BPS": "PSD",
}
# Modes PIL turns into RGB exactly (alpha dropped, as for RGBA). Not I;16 / I / F: PIL clips them to 0-255
# instead of scaling; not CMYK: PIL's conversion ignores the colour profile, so colours would silently change.
RGB_CONVERTIBLE = {"RGB", "RGBA", "L", "LA", "1", "P"}
# What PIL raises on a broken file while opening or decoding it (not MemoryError: that is the server's).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)

# Each progressive scan is a pass over the whole image: thousands of tiny ones make a small file cost minutes.
# Encoders write a dozen or so; counting the marker's bytes anywhere (metadata too) can only overcount.
MAX_JPEG_SCANS = 100
JPEG_SCAN_MARKER = b"\xff\xda"

PALETTE = 3  # the PNG colour type of palette images
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
INFLATE_STEP = 2**20  # bytes of pixel rows inflated at a time while measuring them


def decode_image(data: str, side_limit: int, field: str = "image") -> torch.Tensor:
    """A base64 PNG / JPEG (or a base64 data: URL) as a (1, 3, H, W) tensor in [0, 1]; sides at most `side_limit`.
    Anything else is a RequestError(422) naming `field`: invalid_value, or out_of_range for the size."""
    raw = base64_bytes(data, field)
    kind = image_format(raw, field)
    if kind == "PNG":
        raw = pixel_chunks(raw, side_limit, field)
    elif raw.count(JPEG_SCAN_MARKER) > MAX_JPEG_SCANS:
        raise invalid(field, f"is a JPEG of over {MAX_JPEG_SCANS} scans; save it as a baseline or standard JPEG")
    try:
        with Image.open(io.BytesIO(raw), formats=[kind]) as image:
            check_size(image.width, image.height, side_limit, field)  # from the header, before any pixel
            if image.mode not in RGB_CONVERTIBLE:
                raise invalid(field, f"is a {kind} of mode {image.mode}; send RGB, RGBA or 8-bit greyscale")
            image.load()
            if image.mode == "P":
                check_palette_indices(image, field)
            return image_batch(image.convert("RGB"))
    except Image.DecompressionBombError as err:
        message = f"{field}: declares more pixels than PIL decodes safely ({err})"
        raise RequestError(422, "out_of_range", field, message) from err
    except UnidentifiedImageError as err:
        raise invalid(field, f"is a broken {kind} file that PIL cannot open") from err
    except DECODE_ERRORS as err:
        raise invalid(field, f"is a broken {kind} file ({type(err).__name__}: {err})") from err


def invalid(field: str, what: str) -> RequestError:
    return RequestError(422, "invalid_value", field, f"{field}: {what}")


def base64_bytes(data: str, field: str) -> bytes:
    """The bytes of base64 `data`, which may be a data: URL (data:image/png;base64,...)."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise invalid(field, "a data: URL must be base64, as in data:image/png;base64,<data>")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:  # ValueError: a non-ASCII character
        raise invalid(field, f"is not base64 ({err})") from err
    if not raw:
        raise invalid(field, "is empty")
    return raw


def image_format(raw: bytes, field: str) -> str:
    """PNG or JPEG, from the first bytes; another format is refused by name."""
    if raw.startswith(PNG_SIGNATURE):
        return "PNG"
    if raw.startswith(JPEG_START):
        return "JPEG"
    other = next((name for magic, name in OTHER_FORMATS.items() if raw.startswith(magic)), None)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        other = "WebP"
    elif raw[4:8] == b"ftyp":
        other = "HEIF/AVIF"
    sent = f"in {other} format" if other else f"not an image file (it starts with {raw[:8]!r})"
    raise invalid(field, f"is {sent}; this API takes PNG or JPEG only")


def check_size(width: int, height: int, side_limit: int, field: str) -> None:
    if min(width, height) < 1:
        raise invalid(field, f"declares a size of {width}x{height} pixels")
    if max(width, height) > side_limit:
        raise out_of_range(field, f"sides of at most {side_limit} pixels", f"{width}x{height}")
    bomb_limit = Image.MAX_IMAGE_PIXELS
    if bomb_limit is not None and width * height > bomb_limit:
        raise out_of_range(field, f"at most {bomb_limit} pixels (PIL's decompression bomb limit)", f"{width}x{height}")


class PngHeader(NamedTuple):
    """The IHDR chunk's fields."""

    width: int
    height: int
    depth: int
    colour_type: int
    compression: int
    filter_method: int
    interlace: int


def pixel_chunks(png: bytes, side_limit: int, field: str) -> bytes:
    """`png` rebuilt from the chunks that make its pixels (IHDR, PLTE, tRNS, IDAT, IEND), each checked; every
    other chunk is dropped unread. An animated, truncated or malformed PNG is refused."""
    header, ihdr, palette, transparency, image_data = None, None, None, None, []
    for kind, body in png_chunks(png, field):
        if (kind == b"IHDR") != (header is None):
            raise invalid(field, "is a PNG whose first chunk is not IHDR, or with two IHDR chunks")
        if kind == b"IHDR":
            header, ihdr = png_header(body, side_limit, field), body
        elif kind == b"acTL":
            frames = struct.unpack(">I", body[:4])[0] if len(body) >= 4 else "several"
            raise invalid(field, f"is an animated PNG ({frames} frames); send one still frame as PNG or JPEG")
        elif kind == b"PLTE":
            if len(body) % 3 or not 1 <= len(body) // 3 <= 256:
                raise invalid(field, f"is a PNG with a PLTE chunk of {len(body)} bytes (1 to 256 RGB triples)")
            palette = body
        elif kind == b"tRNS":
            check_transparency(body, header, palette, field)
            transparency = body
        elif kind == b"IDAT":
            image_data.append(body)
    if header.colour_type == PALETTE and palette is None:
        raise invalid(field, "is a palette PNG without a PLTE chunk")
    pixel_data = b"".join(image_data)  # one IDAT: PIL reads many tiny ones slowly
    check_pixel_data(pixel_data, header, field)
    kept = {b"IHDR": ihdr, b"PLTE": palette, b"tRNS": transparency, b"IDAT": pixel_data, b"IEND": b""}
    return PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in kept.items() if body is not None)


def png_chunks(png: bytes, field: str) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk of `png` up to IEND; a truncated file or a bad checksum is refused."""
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(png):
            raise invalid(field, "is a truncated PNG (it ends before its IEND chunk)")
        length, kind = struct.unpack_from(">I4s", png, pos)
        body, crc = png[pos + 8 : pos + 8 + length], png[pos + 8 + length : pos + 12 + length]
        if len(crc) < 4:
            raise invalid(field, f"is a truncated PNG (its {kind.decode('latin-1')!r} chunk ends past the file)")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise invalid(field, f"is a corrupt PNG (bad checksum of its {kind.decode('latin-1')!r} chunk)")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(body: bytes, side_limit: int, field: str) -> PngHeader:
    """The IHDR's fields, checked: the size first, so a huge image is refused before anything else is read."""
    if len(body) != 13:
        raise invalid(field, f"is a PNG with an IHDR chunk of {len(body)} bytes, not 13")
    header = PngHeader(*struct.unpack(">IIBBBBB", body))
    check_size(header.width, header.height, side_limit, field)
    if header.depth not in BIT_DEPTHS.get(header.colour_type, ()):
        what = f"colour type {header.colour_type} and bit depth {header.depth}"
        raise invalid(field, f"is a PNG of {what}, a combination PNG does not define")
    if header.compression or header.filter_method or header.interlace > 1:
        raise invalid(field, f"is a PNG of unknown compression, filter or interlace method {tuple(header[4:])}")
    return header


def check_transparency(body: bytes, header: PngHeader, palette: bytes | None, field: str) -> None:
    """A tRNS chunk holds one alpha per palette colour at most, or one grey / RGB colour."""
    if header.colour_type == PALETTE:
        colours = len(palette) // 3 if palette is not None else 0
        if len(body) > colours:
            raise invalid(field, f"has {len(body)} tRNS entries for a palette of {colours} colours")
    elif header.colour_type in (0, 2) and len(body) != 2 * CHANNELS[header.colour_type]:
        raise invalid(field, f"has a tRNS chunk of {len(body)} bytes for colour type {header.colour_type}")


def check_pixel_data(data: bytes, header: PngHeader, field: str) -> None:
    """The IDAT stream must inflate to at least the rows the header declares (PIL would fill missing rows with
    black). Inflated a step at a time and thrown away, stopping past the declared length: bounded memory."""
    expected, produced, inflater, pending = pixel_data_length(header), 0, zlib.decompressobj(), data
    try:
        while produced <= expected and not inflater.eof:
            piece = inflater.decompress(pending, INFLATE_STEP)
            pending, produced = inflater.unconsumed_tail, produced + len(piece)
            if not piece and not pending:
                break
    except zlib.error as err:
        raise invalid(field, f"is a PNG whose pixel data is corrupt (zlib: {err})") from err
    if produced < expected:
        raise invalid(field, f"is a truncated PNG ({produced} of the {expected} bytes of pixel rows it declares)")


def pixel_data_length(header: PngHeader) -> int:
    """Bytes of the inflated IDAT stream: each row of each (Adam7) pass is a filter byte and its packed pixels."""
    bits = header.depth * CHANNELS[header.colour_type]

    def rows(width: int, height: int) -> int:
        return height * (1 + (width * bits + 7) // 8) if width and height else 0

    if not header.interlace:
        return rows(header.width, header.height)
    w, h = header.width, header.height
    return sum(rows((w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy) for x0, y0, dx, dy in ADAM7)


def check_palette_indices(image: Image.Image, field: str) -> None:
    """A palette pixel past the palette has no colour; PIL would draw it black."""
    colours = len(image.palette.palette) // 3 if image.palette is not None else 0
    highest = image.getextrema()[1]
    if highest >= colours:
        raise invalid(field, f"has a pixel of palette index {highest} but a palette of {colours} colours")
