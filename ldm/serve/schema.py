"""The HTTP API's request and response bodies (pydantic models, which also write its OpenAPI description).

A request uses the pipeline's own argument names. Types are strict (JSON 20 is an int, "20" is not) and an
unknown field is an error, so a typo such as `guidance` is named instead of silently ignored. Limits that
depend on the model or on the server's flags (sizes, steps, images, prompt tokens) are checked in
`ldm.serve.requests`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = (0, 2**32 - 1)  # the page keeps seeds as JavaScript numbers, exact below 2^53


class GenerateRequest(BaseModel):
    """`POST /v1/generate`: one prompt, its images and how to sample them; unset fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="the text to draw ('' samples the unconditional model)")
    negative_prompt: str | None = Field(None, description="guide away from this text instead of ''")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="w; 1 = no guidance (default: model's)")
    num_inference_steps: int | None = Field(None, ge=1, description="sampling steps (default: model's)")
    sampler: str | None = Field(None, description="one of GET /v1/model's `samplers` (default: model's)")
    eta: float | None = Field(None, ge=0, le=1, description="DDIM's noise, 0 = deterministic (ddim only)")
    karras_sigmas: bool | None = Field(None, description="step through Karras et al.'s noise levels")
    seed: int | None = Field(
        None,
        ge=SEED_RANGE[0],
        le=SEED_RANGE[1],
        description="image i is drawn with seed + i; unset: a random seed, returned with the images",
    )
    height: int | None = Field(None, ge=1, description="pixels (default: the model's size, or the image's)")
    width: int | None = Field(None, ge=1, description="pixels (default: the model's size, or the image's)")
    num_images_per_prompt: int = Field(1, ge=1, description="how many images to draw")
    image: str | None = Field(
        None, description="image-to-image: the start image, a base64 PNG or JPEG (a data: URL is accepted)"
    )
    strength: float | None = Field(None, gt=0, le=1, description="with image: how much of the chain to run")
    preview_every: int = Field(
        0, ge=0, description="streaming only: send the decoded x0 prediction every this many steps (0: never)"
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
    name: str = Field(description="the model as `ldm serve --model` named it; also the PNGs' `model` text chunk")
    folder: str = Field(description="the folder's absolute path (or the hub id it was loaded by)")
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
