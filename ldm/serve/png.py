"""PNGs that carry how they were made: the request body that draws them again, in a text chunk.

settings = read_generation_settings(png_bytes)   # POST it to /v1/generate to draw the same image
"""

from __future__ import annotations

import io
import json

from PIL import Image, PngImagePlugin

import ldm

SETTINGS_KEY = "generation_settings"  # JSON: a /v1/generate body with num_images_per_prompt 1
MODEL_KEY = "model"  # the model folder's name
SOFTWARE = f"latent-diffusion-lab {ldm.__version__}"


def png_with_settings(image: Image.Image, settings: dict, model_name: str) -> bytes:
    """`image` as PNG bytes with `settings` (JSON), the model's name and the software in tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    info.add_text(MODEL_KEY, model_name)
    info.add_text("Software", SOFTWARE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_generation_settings(png: bytes) -> dict:
    """The generation settings stored by `png_with_settings`; ValueError when the PNG has none."""
    with Image.open(io.BytesIO(png)) as image:
        text = image.text.get(SETTINGS_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"png: has no {SETTINGS_KEY!r} text chunk")
    return json.loads(text)
