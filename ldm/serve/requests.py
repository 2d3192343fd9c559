"""A request body checked against the model and the server's limits, and turned into a `GenerationSpec`.

Everything a request can get wrong is found here, before it is queued: each failure is a `RequestError`
with an HTTP status, a code and the field at fault, so the client reads what to change and the worker only
ever sees requests it can run.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from pydantic import ValidationError

from ldm.generation import GenerationRequest, LatentDiffusionPipeline
from ldm.generation.checks import OutOfRange
from ldm.generation.request import SAMPLING_FIELDS
from ldm.serve.errors import RequestError, out_of_range
from ldm.serve.images import decode_image
from ldm.serve.schema import SEED_RANGE, GenerateRequest

# pydantic error types -> our codes; anything else is invalid_value.
ERROR_CODES = {
    "extra_forbidden": "unknown_field",
    "missing": "missing_field",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "json_invalid": "invalid_json",
}
FIELDS = tuple(GenerateRequest.model_fields)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server, and how much work it holds at once."""

    max_steps: int = 200
    max_side: int | None = None  # None: 4x the model's default size
    max_images: int = 8  # per request
    max_batch: int = 8  # images sampled together in one pipeline call
    max_queue: int = 32  # requests waiting; one more is answered 429
    max_body_bytes: int = 8 * 2**20  # a 1024^2 PNG as base64 fits
    max_prompt_chars: int = 2000  # before tokenizing, which costs time per character
    max_work: int | None = None  # pixels x steps x images per request; None: see work_limit
    max_decoding: int = 2  # bodies parsed and checked at once (each may hold an 8 MB image and its copies)
    body_timeout_s: float = 60.0  # a body must arrive within this (a slow sender holds a place in the queue)
    deadline_s: float = 600.0  # a request still unanswered this long after it arrived is cancelled (504)

    def side_limit(self, pipe: LatentDiffusionPipeline) -> int:
        return self.max_side or 4 * pipe.default_size

    def work_limit(self, pipe: LatentDiffusionPipeline) -> int:
        """Pixels x sampler steps x images one request may ask for. By default a full batch at the model's
        default size with the most steps: a larger side is paid for with fewer images or steps."""
        return self.max_work or self.max_batch * pipe.default_size**2 * self.max_steps


@dataclass
class GenerationSpec:
    """One checked request: what the worker runs. Image i is drawn with seeds[i]."""

    request: GenerationRequest  # resolved against the model: every default filled in, the image as a tensor
    seeds: list[int]

    @property
    def steps_run(self) -> int:
        """Sampler steps per image: all, or image to image's last share of them."""
        return self.request.steps_run

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys are sampled in one call; None: alone. Only deterministic text-to-image
        batches, because there each image depends on its own x_T alone, so batching cannot change it."""
        r = self.request
        if r.draws_step_noise or r.image is not None:
            return None
        return (*r.settings(SAMPLING_FIELDS).values(), r.preview_every)

    def settings_json(self, seed: int) -> dict:
        """The request body that draws the image of `seed` again, every default filled in."""
        r = self.request
        body = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, **r.settings(SAMPLING_FIELDS)}
        body |= {"seed": seed, "num_images_per_prompt": 1}
        if r.image is not None:
            body["strength"] = r.strength
        return body


def parse_body(raw: bytes) -> GenerateRequest:
    """The JSON body as a GenerateRequest, or a RequestError naming what is wrong (and where in the JSON)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, an int of 5000 digits; deep nesting
        raise RequestError(400, "invalid_json", None, f"the body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise RequestError(400, "invalid_json", None, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from err


def validation_error(err: ValidationError) -> RequestError:
    """The first of pydantic's errors as a RequestError (422) naming the field."""
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    code = ERROR_CODES.get(first["type"], "invalid_value")
    if code == "unknown_field":
        message = f"{field}: is not a field of this request; the fields are {', '.join(FIELDS)}"
    else:
        message = f"{field}: {first['msg']}, got {shortened(repr(first.get('input')))}"
    return RequestError(422, code, field, message)


def resolve_request(request: GenerateRequest, pipe: LatentDiffusionPipeline, limits: ServeLimits) -> GenerationSpec:
    """Check `request` against the model and `limits`; every default resolved, the seed drawn when unset."""
    for field in ("prompt", "negative_prompt"):
        check_prompt(getattr(request, field), field, pipe, limits)
    if request.num_images_per_prompt > limits.max_images:
        raise RequestError(
            422,
            "too_many_images",
            "num_images_per_prompt",
            f"num_images_per_prompt: at most {limits.max_images} per request, got {request.num_images_per_prompt}",
        )
    if request.num_inference_steps is not None and request.num_inference_steps > limits.max_steps:
        raise out_of_range("num_inference_steps", f"at most {limits.max_steps}", request.num_inference_steps)
    side_limit = limits.side_limit(pipe)
    for field in ("height", "width"):
        value = getattr(request, field)
        if value is not None and value > side_limit:
            raise out_of_range(field, f"at most {side_limit} pixels on this server", value)
    pixels = decode_image(request.image, side_limit) if request.image is not None else None
    # The HTTP fields are the generation request's own; image arrives as base64, seed as one per request.
    given = request.model_dump(exclude={"image", "seed", "num_images_per_prompt"})
    try:
        resolved = pipe.resolve(GenerationRequest(**given, image=pixels))
    except ValueError as err:  # the pipeline's messages start with the argument's name
        raise pipeline_error(err) from err
    check_work(resolved, request.num_images_per_prompt, limits.work_limit(pipe))
    # Image i is drawn with seed + i, and each of those seeds must replay from its PNG: the last one in range too.
    count = request.num_images_per_prompt
    last = SEED_RANGE[1] - (count - 1)
    if request.seed is not None and request.seed > last:
        raise out_of_range("seed", f"at most {last} for {count} images (image i: seed + i)", request.seed)
    seed = secrets.randbelow(last + 1) if request.seed is None else request.seed
    return GenerationSpec(resolved, seeds=[seed + i for i in range(count)])


def check_work(resolved: GenerationRequest, images: int, cap: int) -> None:
    """Refuse a request whose images x sampler steps x pixels exceed `cap`: it would hold the worker for long."""
    steps, height, width = resolved.steps_run, resolved.height, resolved.width
    work = images * steps * height * width
    if work <= cap:
        return
    of_all = f" (of {resolved.num_inference_steps}, strength {resolved.strength})" if resolved.image is not None else ""
    message = (
        f"this request is {images} image{'s' * (images > 1)} x {steps} steps{of_all} x {height}x{width} pixels = "
        f"{work} pixel-steps; this server's cap is {cap} (--max-work): ask for fewer images, steps or pixels"
    )
    raise RequestError(422, "too_much_work", None, message)


def check_prompt(prompt: str | None, field: str, pipe: LatentDiffusionPipeline, limits: ServeLimits) -> None:
    """A prompt longer than the text encoder reads would be cut silently; here it is refused by name."""
    if prompt is None:
        return
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(
            422, "prompt_too_long", field, f"{field}: {len(prompt)} characters; at most {limits.max_prompt_chars}"
        )
    tokens, limit = pipe.text_encoder.token_count(prompt), pipe.text_encoder.max_length
    if tokens > limit:
        raise RequestError(
            422,
            "prompt_too_long",
            field,
            f"{field}: {tokens} tokens (with BOS and EOS); the text encoder reads {limit}, so shorten it",
        )


def pipeline_error(err: ValueError) -> RequestError:
    """A pipeline ValueError ("name: what is wrong") as a 422 naming the field."""
    message = str(err)
    name = message.split(":", 1)[0]
    code = "out_of_range" if isinstance(err, OutOfRange) else "invalid_value"
    return RequestError(422, code, name if name in FIELDS else None, message)


def shortened(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters: an error message does not echo a megabyte of the client's input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
