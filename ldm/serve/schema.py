"""The HTTP API's request and response bodies (pydantic models, which also write its OpenAPI description).

A request is the generation request's own fields (`HTTP_FIELDS`). Types are strict (JSON 20 is an int, "20" is
not) and an unknown field is an error, so a typo such as `guidance` is named instead of silently ignored. Limits
that depend on the model or on the server's flags (sizes, steps, images, prompt tokens) are checked in
`ldm.serve.requests`; every other value is checked by the request's own resolve.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ldm.diffusion.sampler_table import SAMPLER_NAMES
from ldm.generation.request import GenerationRequest, field_doc

SEED_RANGE = (0, 2**32 - 1)  # the page keeps seeds as JavaScript numbers, exact below 2^53


# The HTTP request is the generation request's fields that JSON can carry, with their descriptions and defaults;
# here only what differs on the wire: a JSON type (one prompt, a base64 image, one seed) and the server's bounds.
# Every other check is the request's own resolve (ldm.generation.request), answered as 422 naming the field.
HTTP_FIELDS: dict[str, tuple[object, dict]] = {
    "prompt": (str, {"default": ...}),
    "negative_prompt": (str | None, {}),
    "guidance_scale": (float | None, {"le": 100}),
    "num_inference_steps": (int | None, {}),
    "sampler": (Literal[SAMPLER_NAMES] | None, {}),  # type: ignore[valid-type]
    "eta": (float | None, {}),
    "karras_sigmas": (bool | None, {}),
    "seed": (int | None, {"ge": SEED_RANGE[0], "le": SEED_RANGE[1], "description": "image i is drawn with seed + i; "
                          "unset: a random seed, returned with the images"}),
    "height": (int | None, {}),
    "width": (int | None, {}),
    "num_images_per_prompt": (int, {"ge": 1}),
    "image": (str | None, {"description": "image-to-image: the start image, a base64 PNG or JPEG (a data: URL is "
                           "accepted)"}),
    "strength": (float | None, {}),
    "preview_every": (int, {"ge": 0, "description": "streaming only: send the decoded x0 prediction every this "
                                                    "many steps (0: never)"}),
}  # fmt: skip


def _http_field(name: str, json_type: object, overrides: dict) -> tuple[object, object]:
    default = next(f.default for f in fields(GenerationRequest) if f.name == name)
    settings = {"default": default, "description": field_doc(name)} | overrides
    return json_type, Field(**settings)


GenerateRequest = create_model(
    "GenerateRequest",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="`POST /v1/generate`: one prompt, its images and how to sample them; unset fields take the model's "
    "defaults.",
    **{name: _http_field(name, json_type, overrides) for name, (json_type, overrides) in HTTP_FIELDS.items()},
)


class GeneratedImage(BaseModel):
    seed: int = Field(description="the seed this image alone is drawn with (num_images_per_prompt = 1)")
    png_base64: str = Field(description="the PNG, with its generation settings in the 'generation_settings' text chunk")


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    settings: dict = Field(description="the request as sampled: every default filled in, the seed of the first image")
    timings: dict = Field(description="seconds spent waiting in the queue and sampling")


class ErrorDetail(BaseModel):
    code: str = Field(description="invalid_json, unknown_field, missing_field, invalid_value, out_of_range, ...")
    field: str | None = Field(description="the request field at fault, when one is")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    queued: int = Field(description="requests waiting")
    running: int = Field(description="requests being sampled")


class ModelInfo(BaseModel):
    name: str = Field(description="the model folder's name (not its path), or its hub id; also the PNGs' `model` chunk")
    components: dict = Field(description="model_index.json: each part's library and class")
    defaults: dict = Field(description="the folder's sampling defaults (ldm_sampling.json)")
    samplers: list[str]
    default_size: int = Field(description="the side the U-Net was built for, in pixels")
    size_multiple: int = Field(description="heights and widths must be multiples of this")
    max_prompt_tokens: int = Field(description="the text encoder's length, BOS and EOS included")
    prediction_type: str
    device: str
    dtype: str
    limits: dict = Field(description="this server's limits: steps, side, images per request, queue, body bytes")
